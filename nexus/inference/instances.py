"""What a node agent runs for the model instances placed on its node: one serving worker each.

Pure functions over instance rows (plus one query). The master answers each
heartbeat with the node's desired instances (`instance_orders`); the agent's
loop (nexus.agent.instance_runner) then works out what changed:

    orders = instance_orders(conn, node_id)                      # master, per heartbeat
    start, stop = reconcile(orders, running_names)               # agent: what changed
    specs = [instance_child(i, node_id, node_name, settings, os.environ, concurrency) for i in start]

An instance's worker is `nexus worker --model NAME` told its instance id: it
pulls the weights (through the object store), starts the backend (a `vllm
serve` subprocess on GPU nodes), reports downloading / starting / running /
error on the instance row and keeps its liveness fresh; when the instance is
stopped it stops serving, and the agent stops the process.
"""

from __future__ import annotations

import sys
from typing import Iterable, Mapping

from sqlalchemy import Connection, text

from nexus.agent.supervisor import ChildSpec
from nexus.config import Settings
from nexus.inference.placement import ParallelismPlan
from nexus.queueing.routing import model_queue

CHILD_PREFIX = "model-"


def desired_instances(conn: Connection, node_id: str) -> list[dict]:
    """Instances that should run on this node: active ones whose server (head stage) is here."""
    rows = conn.execute(text(
        "SELECT * FROM model_instances WHERE node_id = :node AND state IN ('pending', 'downloading', 'starting', "
        "'running', 'error') ORDER BY created_at"), {"node": node_id}).mappings()
    return [dict(r) for r in rows]


def instance_orders(conn: Connection, node_id: str) -> list[dict]:
    """The desired instances as the master sends them to the node's agent (JSON: what a child needs)."""
    return [{"id": str(row["id"]), "model": row["model"], "plan": row.get("plan") or {},
             "gpus": list(row.get("gpus") or [])} for row in desired_instances(conn, node_id)]


def child_name(instance: dict) -> str:
    return f"{CHILD_PREFIX}{instance['id']}"


def reconcile(desired: Iterable[dict], running: Iterable[str]) -> tuple[list[dict], list[str]]:
    """(instances to start, child names to stop) to go from the running children to the desired ones."""
    desired = list(desired)
    wanted = {child_name(instance) for instance in desired}
    running = set(running)
    start = [instance for instance in desired if child_name(instance) not in running]
    stop = sorted(name for name in running if name.startswith(CHILD_PREFIX) and name not in wanted)
    return start, stop


def instance_child(instance: dict, node_id: str, node_name: str, settings: Settings,
                   base_env: Mapping[str, str], concurrency: int | None = None) -> ChildSpec:
    """The serving worker of one instance, on the instance's GPUs of this node.

    `concurrency`: requests in flight in the worker (the node's max_concurrent); None keeps
    the settings' own. It is the worker's thread count too, so that every request slot has a
    thread and a vLLM server sees that many requests at once to batch."""
    plan = ParallelismPlan.from_dict(instance.get("plan") or {})
    gpus = [gpu for stage in plan.stages if stage.node_id == node_id for gpu in stage.gpus] or \
        list(instance.get("gpus") or [])
    model = instance["model"]
    # The guard stops the worker (and its vLLM server) when the agent dies, even by SIGKILL.
    argv = (sys.executable, "-m", "nexus.agent.orphan_guard",
            sys.executable, "-m", "nexus", "worker", "--name", f"{child_name(instance)}@{node_name}",
            "-Q", model_queue(model), "--model", model)
    env = dict(base_env)
    env.update(
        NEXUS_NODE_ID=node_id,
        NEXUS_NODE_NAME=node_name,
        NEXUS_WORKER_INSTANCE_ID=str(instance["id"]),
        NEXUS_WORKER_POOL="threads",  # the backend lives in the worker process; requests share it
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        CUDA_VISIBLE_DEVICES=",".join(str(g) for g in gpus),
        HF_HUB_OFFLINE="1",
    )
    if concurrency is not None:
        env.update(NEXUS_INFERENCE_CONCURRENCY=str(concurrency), NEXUS_WORKER_CONCURRENCY=str(concurrency))
    return ChildSpec(name=child_name(instance), argv=argv, env=env)
