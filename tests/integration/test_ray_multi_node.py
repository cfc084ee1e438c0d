"""Two real agents form a Ray cluster for an instance whose plan spans both nodes, and tear it down.

Two `nexus agent` processes pretend to be one-GPU nodes (the RTX 4090 hardware
fixture) at 127.0.0.2 and 127.0.0.3. A vLLM model of 30 GB deployed on both
gets a pipeline_parallel plan of two stages, one per node: the head's agent runs
`ray start --head` and the serving worker, the other joins with the instance's
token. Ray itself is real; only `vllm serve` is replaced (no GPU here), by
tests/ray_vllm_standin.py, which does vLLM's Ray half: a placement group of one
{"GPU": 1} bundle per stage, an actor in each, then /health. The test reads the
cluster through Ray (both nodes, their GPUs, the placement group on both), then
stops the instance: no process with the instance's token is left. Then a member
is lost (its agent stops): the instance goes to `error`, the head tears its Ray
node down, and when the member is back the instance is placed again on a new
cluster. Run alone with `pytest -k ray`.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import requests
from sqlalchemy import text

from nexus.models.ray_clusters import PORT_BLOCK, RayCluster
from nexus.serving.ray_probe import RayClusterNotReady, cluster_state
from tests.agent_support import ApiClient, FIXTURES
from tests.inference_support import MODEL_ENV, tiny_model_dir  # noqa: F401
from tests.support import NexusProcess, wait_for

pytestmark = pytest.mark.timeout(600)

MODEL = "ray-tiny"
ADDRESSES = {"ray-node-a": "127.0.0.2", "ray-node-b": "127.0.0.3"}
STANDIN = Path(__file__).parents[1] / "ray_vllm_standin.py"


class Api(ApiClient):
    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in self("GET", "/api/v1/nodes")["nodes"] if n["name"] in ADDRESSES}

    def instance(self, instance_id: str) -> dict:
        return next(i for i in self("GET", f"/api/v1/models/{MODEL}/instances")["instances"] if i["id"] == instance_id)


def cluster_of(services, instance_id: str) -> RayCluster:
    with services.engine.connect() as conn:
        plan = conn.execute(text("SELECT plan FROM model_instances WHERE id = :id"), {"id": instance_id}).scalar_one()
    return RayCluster.from_plan(plan)


def holders(token: str) -> list[psutil.Process]:
    """Every process of this machine that holds the instance's Ray token: its Ray nodes, workers and server."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAY_AUTH_TOKEN") == token:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def under(temp_root: Path) -> list[psutil.Process]:
    """Ray processes started with a folder under `temp_root` (for a run that failed before reading a token)."""
    found = []
    for process in psutil.process_iter():
        try:
            if any(str(temp_root) in arg for arg in process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def ports_free(base: int) -> bool:
    for port in range(base, base + PORT_BLOCK):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


def running(api: Api, instance_id: str, agents: dict[str, NexusProcess]) -> dict:
    def check():
        for agent in agents.values():
            assert agent.process.poll() is None, agent.log_text()[-3000:]
        instance = api.instance(instance_id)
        assert not (instance["state"] == "error" and "member node lost" not in (instance["error"] or "")), \
            instance["error"]
        return instance["state"] == "running" and instance

    return wait_for(check, timeout=300, interval=1, what="the multi-node instance running")


def check_cluster(services, instance: dict, reports: Path) -> RayCluster:
    """Ray says what the plan asked for: both nodes with one GPU each, one placement group across them."""
    cluster = cluster_of(services, instance["id"])
    head_address = ADDRESSES[next(name for name, n in NODES.items() if n == instance["node_id"])]
    state = cluster_state(f"{head_address}:{cluster.ports.gcs}", {**RAY_ENV, "RAY_AUTH_TOKEN": cluster.token}, 120)
    alive = {n["address"]: n for n in state["nodes"] if n["alive"]}
    assert set(alive) == set(ADDRESSES.values())
    assert all(n["resources"].get("GPU") == 1.0 for n in alive.values())
    [group] = [g for g in state["placement_groups"] if g["state"] == "CREATED"]
    assert group["bundles"] == [{"GPU": 1.0}, {"GPU": 1.0}] and group["strategy"] == "PACK"
    assert set(group["bundles_to_node_id"]) == {n["node_id"] for n in alive.values()}  # one stage per node

    report = json.loads((reports / f"{instance_port(reports, group)}.json").read_text())
    argv = report["argv"]
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert (flags["--tensor-parallel-size"], flags["--pipeline-parallel-size"]) == ("1", "2")
    assert flags["--distributed-executor-backend"] == "ray"
    assert {w["address"] for w in report["workers"]} == set(ADDRESSES.values())
    assert report["driver_address"] == report["vllm_host_ip"] == head_address  # vllm serve runs on the head
    return cluster


def instance_port(reports: Path, group: dict) -> str:
    """The port of the stand-in that made this placement group. Polled: on a loaded machine the serving
    worker may have restarted its `vllm serve`, whose new report lands just after the group shows."""
    def find() -> str | None:
        return next((path.stem for path in reports.glob("*.json")
                     if json.loads(path.read_text())["placement_group"] == group["id"]), None)

    try:
        return wait_for(find, timeout=30, interval=0.5, what="the stand-in's report")
    except TimeoutError:
        raise AssertionError(f"no stand-in report for placement group {group['id']}") from None


def torn_down(token: str, temp_root: Path) -> None:
    wait_for(lambda: not holders(token), timeout=90, interval=1, what="every process of the Ray cluster gone")
    # The agent removes a Ray node's folder once its `ray start` has exited.
    wait_for(lambda: not any(temp_root.iterdir()), timeout=30, interval=0.5, what="the Ray nodes' folders removed")


NODES: dict[str, str] = {}  # node name -> id, for this test's run
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def test_two_agents_form_and_tear_down_a_ray_cluster_for_a_two_node_instance(
        settings, services, live_api, reconciler, tmp_path, tiny_model_dir):
    assert ports_free(settings.ray_port_base) and ports_free(settings.ray_port_base + PORT_BLOCK), \
        "the Ray port blocks of this test are taken on this machine"
    api = Api(*live_api)
    api("POST", "/api/v1/models", expect=201, json={"name": MODEL, "source": str(tiny_model_dir), "backend": "vllm",
                                                     "vram_mb": 30_000, "min_tier": "gpu_peer", "max_model_len": 512})
    reports = tmp_path / "standin"
    reports.mkdir()
    vllm = tmp_path / "vllm"
    vllm.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    vllm.chmod(0o755)
    temp_root = Path(tempfile.mkdtemp(prefix="nxray-", dir="/tmp"))  # short: Ray's socket paths
    agents: dict[str, NexusProcess] = {}
    tokens: list[str] = []

    def start_agent(name: str) -> NexusProcess:
        env = {**MODEL_ENV, "NEXUS_DATA_DIR": str(tmp_path / name), "NEXUS_NODE_NAME": name,
               "NEXUS_NODE_ADDRESS": ADDRESSES[name], "NEXUS_HEARTBEAT_INTERVAL_SECONDS": "0.5",
               "NEXUS_AGENT_DRAIN_GRACE_SECONDS": "30", "NEXUS_VLLM_EXECUTABLE": str(vllm),
               "NEXUS_VLLM_STARTUP_TIMEOUT_SECONDS": "240", "NEXUS_RAY_TEMP_ROOT": str(temp_root),
               "VLLM_STANDIN_REPORT_DIR": str(reports),
               # Ray drains a node for up to 30 s on SIGTERM; nothing runs on these after their instance stops.
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}
        agents[name] = NexusProcess(settings, ["agent", "--hardware-fixture", str(FIXTURES / "rtx4090.json")],
                                    tmp_path, name, env).start()
        return agents[name]

    try:
        for name in ADDRESSES:
            start_agent(name)
        nodes = wait_for(lambda: (n := api.nodes()) and len(n) == 2 and all(x["state"] == "ready" for x in n.values())
                         and n, timeout=90, what="both agents registered")
        NODES.update({name: node["id"] for name, node in nodes.items()})

        deployed = api("POST", f"/api/v1/models/{MODEL}/instances", expect=201,
                       json={"nodes": list(NODES.values()), "tensor_parallel_size": 1, "pipeline_parallel_size": 2})
        plan = deployed["plan"]
        assert plan["strategy"] == "pipeline_parallel" and {s["node_id"] for s in plan["stages"]} == set(NODES.values())
        assert set(plan["ray"]) == {"port_base"}  # the token is not shown
        first = running(api, deployed["id"], agents)
        cluster = check_cluster(services, first, reports)
        tokens.append(cluster.token)
        with pytest.raises(RayClusterNotReady):  # another token does not join or connect
            head = ADDRESSES[next(n for n, i in NODES.items() if i == first["node_id"])]
            cluster_state(f"{head}:{cluster.ports.gcs}", {**RAY_ENV, "RAY_AUTH_TOKEN": "0" * 64}, 120)

        api("DELETE", f"/api/v1/models/{MODEL}/instances/{first['id']}")
        torn_down(cluster.token, temp_root)

        # A member is lost: the instance goes to error, the head tears down; back, it is placed again.
        second = running(api, api("POST", f"/api/v1/models/{MODEL}/instances", expect=201,
                                  json={"nodes": list(NODES.values()), "pipeline_parallel_size": 2})["id"], agents)
        lost_cluster = cluster_of(services, second["id"])
        tokens.append(lost_cluster.token)
        member = next(name for name, node_id in NODES.items() if node_id != second["node_id"])
        agents[member].signal(signal.SIGTERM)
        assert agents[member].process.wait(60) == 0, agents[member].log_text()[-3000:]
        failed = wait_for(lambda: (i := api.instance(second["id"]))["state"] == "error" and i, timeout=60,
                          what="the instance in error")
        assert failed["error"] == f"member node lost: {member}"
        torn_down(lost_cluster.token, temp_root)

        start_agent(member)
        again = running(api, second["id"], agents)
        assert again["error"] is None  # the serving worker took it again
        placed = check_cluster(services, again, reports)
        tokens.append(placed.token)
        assert placed.token != lost_cluster.token and placed.port_base != lost_cluster.port_base
        api("DELETE", f"/api/v1/models/{MODEL}/instances/{second['id']}")
        torn_down(placed.token, temp_root)
    finally:
        for agent in agents.values():
            agent.stop(timeout=60)
            print(f"--- {agent.name}\n{agent.log_text()[-6000:]}")  # shown when the test fails
        leaked = [p for token in tokens for p in holders(token)] + under(temp_root)
        for process in leaked:  # a failed run leaves nothing behind either
            process.kill()
        shutil.rmtree(temp_root, ignore_errors=True)
        api("DELETE", f"/api/v1/models/{MODEL}")
    assert not leaked, [p.pid for p in leaked]
