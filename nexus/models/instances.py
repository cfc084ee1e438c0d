"""What a node agent runs for the model instances placed on its node: one serving worker each.

Pure functions over instance rows (plus one query). The master answers each
heartbeat with the node's desired instances (`instance_orders`); the agent's
loop (nexus.agent.instance_runner) then works out what changed, and
nexus.worker.processes builds the children:

    orders = instance_orders(conn, node_id)                      # master, per heartbeat
    start, stop = reconcile(orders, running_names)               # agent: what changed
    specs = [instance_child(i, node_id, node_name, settings, os.environ, concurrency) for i, _ in start]

An instance's worker is `nexus worker --model NAME` told its instance id: it
pulls the weights (through the object store), starts the backend (a `vllm
serve` subprocess on GPU nodes), reports downloading / starting / running /
error on the instance row and keeps its liveness fresh; when the instance is
stopped it stops serving, and the agent stops the process.
"""

from __future__ import annotations

import json
from typing import Iterable

from sqlalchemy import Connection, text

from nexus.models.ray_clusters import LOST_MEMBER, ray_order, without_ray

CHILD_PREFIX = "model-"
RAY_CHILD_PREFIX = "ray-"  # the node's Ray node of a multi-node instance (nexus.agent.ray_node)


def desired_instances(conn: Connection, node_id: str) -> list[dict]:
    """Instances that should run on this node: active ones whose server (head stage) is here, and those
    whose Ray cluster this node is a member of. An instance that lost a member is wanted nowhere: every
    member tears its Ray node down until the instance is placed again."""
    rows = conn.execute(text(
        "SELECT i.*, head.resources->>'address' AS head_address FROM model_instances i "
        "LEFT JOIN nodes head ON CAST(head.id AS text) = i.node_id "
        "WHERE (i.node_id = :node OR (i.plan ? 'ray' AND i.plan->'stages' @> CAST(:member AS jsonb))) "
        "AND i.state IN ('pending', 'downloading', 'starting', 'running', 'error') "
        "AND NOT (i.plan ? 'ray' AND i.state = 'error' AND coalesce(i.error, '') LIKE :lost) "
        "ORDER BY i.created_at"),
        {"node": node_id, "member": json.dumps([{"node_id": node_id}]), "lost": LOST_MEMBER + "%"}).mappings()
    return [dict(r) for r in rows]


def instance_orders(conn: Connection, node_id: str) -> list[dict]:
    """The desired instances as the master sends them to the node's agent (JSON: what a child needs)."""
    orders = []
    for row in desired_instances(conn, node_id):
        order = {"id": str(row["id"]), "model": row["model"], "plan": without_ray(row.get("plan")),
                 "gpus": list(row.get("gpus") or [])}
        ray = ray_order(row, node_id, row.get("head_address"))
        if ray is not None:
            order.update(ray=ray.to_dict(), gpus=list(ray.gpus))
        orders.append(order)
    return orders


def child_name(instance: dict) -> str:
    return f"{CHILD_PREFIX}{instance['id']}"


def ray_child_name(instance: dict) -> str:
    return f"{RAY_CHILD_PREFIX}{instance['id']}"


def children_of(instance: dict) -> list[str]:
    """The agent's children for one instance: its Ray node when it spans nodes, and its serving worker
    on the node that runs the server (a member only lends its GPUs to the head's Ray cluster)."""
    ray = instance.get("ray")
    if ray is None:
        return [child_name(instance)]
    if not ray.get("head_address"):
        return []  # the head's node has not said where it is reached: nothing to join yet
    return [ray_child_name(instance), child_name(instance)] if ray["role"] == "head" else [ray_child_name(instance)]


def reconcile(desired: Iterable[dict], running: Iterable[str]) -> tuple[list[tuple[dict, str]], list[str]]:
    """((instance, child name) to start, child names to stop) to go from the running children to the desired."""
    running = set(running)
    wanted = [(instance, name) for instance in desired for name in children_of(instance)]
    start = [(instance, name) for instance, name in wanted if name not in running]
    names = {name for _, name in wanted}
    stop = sorted(name for name in running if name.startswith((CHILD_PREFIX, RAY_CHILD_PREFIX)) and name not in names)
    return start, stop
