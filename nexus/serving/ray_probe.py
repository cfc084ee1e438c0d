"""What a Ray cluster holds right now: its nodes and placement groups, read by a short-lived process.

    python -m nexus.serving.ray_probe HOST:PORT      # prints {"nodes": [...], "placement_groups": [...]}

Connecting makes a process a Ray driver, so the serving worker never connects
itself: it runs this probe (RAY_AUTH_TOKEN in its environment) until every
member of a multi-node instance has joined, and only then starts `vllm serve`,
so the server never races the cluster's formation. Ray is imported here only,
and only on nodes that run such an instance (`pip install nexus[gpu]`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Mapping


class RayClusterNotReady(RuntimeError):
    pass


def cluster_state(address: str, env: Mapping[str, str] | None = None, timeout_seconds: float = 60.0) -> dict[str, Any]:
    """The cluster's nodes and placement groups; RayClusterNotReady when it cannot be reached."""
    try:
        done = subprocess.run([sys.executable, "-m", "nexus.serving.ray_probe", address], capture_output=True,
                              text=True, timeout=timeout_seconds, env=dict(env if env is not None else os.environ))
    except subprocess.TimeoutExpired:
        raise RayClusterNotReady(f"the Ray cluster at {address} did not answer in {timeout_seconds:.0f} s") from None
    if done.returncode != 0:
        raise RayClusterNotReady(f"the Ray cluster at {address} cannot be reached: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def wait_for_nodes(address: str, count: int, timeout_seconds: float, env: Mapping[str, str] | None = None,
                   interval_seconds: float = 2.0) -> dict[str, Any]:
    """The cluster's state once `count` nodes are alive in it; RayClusterNotReady after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    seen = "no answer"
    while True:
        try:
            state = cluster_state(address, env, timeout_seconds=max(5.0, min(60.0, deadline - time.monotonic())))
            alive = [n for n in state["nodes"] if n["alive"]]
            if len(alive) >= count:
                return state
            seen = f"{len(alive)} of {count} nodes: {', '.join(n['address'] for n in alive)}"
        except RayClusterNotReady as error:
            seen = str(error)
        if time.monotonic() + interval_seconds > deadline:
            raise RayClusterNotReady(f"the Ray cluster at {address} has not formed in {timeout_seconds:.0f} s ({seen})")
        time.sleep(interval_seconds)


def _read(address: str) -> dict[str, Any]:
    import ray
    from ray.util.placement_group import placement_group_table

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
                  "resources": n.get("Resources", {})} for n in ray.nodes()]
        groups = [{"id": pg_id, "state": pg["state"], "strategy": pg["strategy"],
                   "bundles": [pg["bundles"][i] for i in sorted(pg["bundles"])],
                   "bundles_to_node_id": [pg["bundles_to_node_id"].get(i) for i in sorted(pg["bundles"])]}
                  for pg_id, pg in placement_group_table().items()]
        return {"nodes": nodes, "placement_groups": groups}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nexus.serving.ray_probe HOST:PORT")
    print(json.dumps(_read(sys.argv[1])))
