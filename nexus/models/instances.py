"""What a node agent runs for the model instances placed on its node: one serving worker each.

Pure functions over instance rows (plus one query). The master answers each
heartbeat with the node's desired instances (`instance_orders`); the agent's
loop (nexus.agent.instance_runner) then works out what changed, and
nexus.worker.processes builds the children:

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

from typing import Iterable

from sqlalchemy import Connection, text


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
