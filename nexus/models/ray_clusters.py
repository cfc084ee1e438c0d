"""Ray clusters for instances whose plan spans nodes: what the master allocates and watches.

vLLM runs a plan across nodes on Ray (`--distributed-executor-backend ray`): the
server on the head stage's node connects to a Ray cluster (RAY_ADDRESS) and puts
one worker per GPU in a placement group of tensor x pipeline bundles of one GPU
each. Each such instance gets a Ray cluster of its own, formed by the agents of
its nodes (nexus.agent.ray_node) and torn down with the instance:

    deploy (master)     allocate(): a block of PORT_BLOCK ports and a token, kept in the plan
    heartbeat answer    the head's node: `ray start --head`, then the serving worker (vllm serve)
                        every other member: `ray start --address HEAD:GCS` with the same token
    stop (DELETE)       the orders disappear: every member stops its Ray node
    a member is lost    fail_lost_members(): the instance goes to `error`, the orders stop (every
                        member tears its Ray node down), and replace_failed() places it again

One block of PORT_BLOCK ports per instance, cut by member (the nodes in plan
order, the head first), so the firewall rule between nodes is one range per
instance slot, and two members never need the same port (on one test machine,
they cannot have it):

    base + 0                         GCS (the head's; the others join it)
    base + 8 + 24*m + 0 .. + 5       member m: node manager, object manager, runtime env agent,
                                     dashboard agent gRPC and HTTP, metrics export
    base + 8 + 24*m + 6 .. + 23      member m: Ray worker processes (vLLM's actors, one per GPU)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from sqlalchemy import Connection, Engine, text

from nexus.config import Settings
from nexus.models import catalog
from nexus.models.placement import (PENDING_RESERVATION, ParallelismPlan, PlacementError, PlacementRequest,
                                    pending_reservations, place)

PORT_BLOCK = 200
MEMBER_PORTS = 24  # per member: 6 for Ray's own processes, 18 for its workers
FIRST_MEMBER_PORT = 8
LOST_MEMBER = "member node lost: "  # the error of an instance this module takes down and places again
_LOCK_KEY = 0x6E787261  # advisory lock: two deploys at once never take the same port block
# Member states whose agent has stopped (or will stop) its Ray node: drained, quarantined, gone.
_LOST_STATES = ("draining", "quarantined", "offline", "removed")


@dataclass(frozen=True)
class RayPorts:
    """The ports of member `member`'s Ray node in the instance's block."""

    base: int
    member: int = 0

    @property
    def gcs(self) -> int:
        return self.base

    @property
    def _first(self) -> int:
        return self.base + FIRST_MEMBER_PORT + MEMBER_PORTS * self.member

    @property
    def node_manager(self) -> int:
        return self._first

    @property
    def object_manager(self) -> int:
        return self._first + 1

    @property
    def runtime_env_agent(self) -> int:
        return self._first + 2

    @property
    def dashboard_agent_grpc(self) -> int:
        return self._first + 3

    @property
    def dashboard_agent_http(self) -> int:
        return self._first + 4

    @property
    def metrics_export(self) -> int:
        return self._first + 5

    @property
    def min_worker(self) -> int:
        return self._first + 6

    @property
    def max_worker(self) -> int:
        return self._first + MEMBER_PORTS - 1


@dataclass(frozen=True)
class RayCluster:
    """What the master keeps in an instance's plan (`plan.ray`): its port block and its token."""

    port_base: int
    token: str  # Ray token authentication (RAY_AUTH_MODE=token): only this instance's members join

    @property
    def ports(self) -> RayPorts:
        return RayPorts(self.port_base)

    def to_dict(self) -> dict[str, Any]:
        return {"port_base": self.port_base, "token": self.token}

    @classmethod
    def from_plan(cls, plan: dict | None) -> "RayCluster | None":
        data = (plan or {}).get("ray")
        return cls(int(data["port_base"]), str(data["token"])) if data else None


@dataclass(frozen=True)
class RayOrder:
    """One node's part in an instance's Ray cluster, as the heartbeat answer carries it."""

    role: str  # "head" (runs vllm serve) or "member"
    head_address: str  # "" until the head's node has reported where it is reached
    port_base: int
    token: str
    gpus: tuple[int, ...]  # this node's GPUs in the plan
    nodes: int  # members in all, the head included
    member: int = 0  # this node's place among them (the head is 0): which ports of the block are its own

    @property
    def ports(self) -> RayPorts:
        return RayPorts(self.port_base, self.member)

    @property
    def head(self) -> bool:
        return self.role == "head"

    @property
    def gcs_address(self) -> str:
        return f"{self.head_address}:{self.ports.gcs}"

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "head_address": self.head_address, "port_base": self.port_base,
                "token": self.token, "gpus": list(self.gpus), "nodes": self.nodes, "member": self.member}

    @classmethod
    def from_dict(cls, data: dict) -> "RayOrder":
        return cls(str(data["role"]), str(data.get("head_address") or ""), int(data["port_base"]), str(data["token"]),
                   tuple(int(g) for g in data.get("gpus", ())), int(data["nodes"]), int(data.get("member", 0)))


def ray_order(row: dict, node_id: str, head_address: str | None) -> RayOrder | None:
    """This node's part in the instance's Ray cluster; None for an instance on one node."""
    cluster = RayCluster.from_plan(row.get("plan"))
    if cluster is None:
        return None
    plan = ParallelismPlan.from_dict(row["plan"])
    gpus = tuple(g for stage in plan.stages if stage.node_id == node_id for g in stage.gpus)
    role = "head" if str(row["node_id"]) == node_id else "member"
    member = plan.node_ids.index(node_id) if node_id in plan.node_ids else 0
    return RayOrder(role, head_address or "", cluster.port_base, cluster.token, gpus, len(plan.node_ids), member)


def without_ray(plan: dict | None) -> dict:
    return {k: v for k, v in (plan or {}).items() if k != "ray"}


# --- the master's side -----------------------------------------------------------------------


def allocate(conn: Connection, settings: Settings) -> RayCluster:
    """A free port block and a new token; PlacementError when every block is taken."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    used = {row[0] for row in conn.execute(text(
        "SELECT (plan->'ray'->>'port_base')::int FROM model_instances WHERE state <> 'stopped' AND plan ? 'ray'"))}
    for slot in range(settings.ray_port_slots):
        base = settings.ray_port_base + slot * PORT_BLOCK
        if base + PORT_BLOCK - 1 > 65535:
            break
        if base not in used:
            return RayCluster(base, secrets.token_hex(32))
    raise PlacementError(f"every Ray port block is taken ({len(used)} multi-node instances; "
                         "raise NEXUS_RAY_PORT_SLOTS)")


_LOST = text(f"""
    UPDATE model_instances i SET state = 'error', updated_at = now(),
           error = '{LOST_MEMBER}' || lost.names
    FROM (SELECT i2.id, string_agg(coalesce(n.name, s.stage->>'node_id'), ', ') AS names
          FROM model_instances i2
          CROSS JOIN LATERAL jsonb_array_elements(i2.plan->'stages') AS s(stage)
          LEFT JOIN nodes n ON CAST(n.id AS text) = s.stage->>'node_id'
          WHERE i2.plan ? 'ray' AND i2.state IN ('pending', 'downloading', 'starting', 'running')
            AND (n.id IS NULL OR n.state IN {_LOST_STATES!r})
          GROUP BY i2.id) AS lost
    WHERE i.id = lost.id
    RETURNING i.id, i.model, i.error""")


def fail_lost_members(conn: Connection) -> list[dict]:
    """Multi-node instances with a member that stopped or went away go to `error`; their orders stop,
    so every member tears its Ray node down."""
    return [dict(row) for row in conn.execute(_LOST).mappings()]


def replace_failed(conn: Connection, settings: Settings, now: datetime,
                   fleet: Callable[[Connection], tuple[list, list]]) -> list[dict]:
    """Place again the instances that lost a member: a new plan (same sizes), port block and token,
    back to `pending`. An instance that fits nowhere yet stays in `error` for the next pass."""
    failed = conn.execute(text(
        "SELECT * FROM model_instances WHERE state = 'error' AND error LIKE :lost ORDER BY created_at FOR UPDATE"),
        {"lost": LOST_MEMBER + "%"}).mappings().all()
    placed = []
    for row in failed:
        spec = catalog.get_model(conn, row["model"])
        if spec is None:
            continue
        old = ParallelismPlan.from_dict(row["plan"])
        nodes, reservations = fleet(conn)
        others = [i for i in catalog.list_instances(conn, active_only=True) if i["id"] != row["id"]]
        reservations = [*reservations, *pending_reservations(others, now + PENDING_RESERVATION)]
        request = PlacementRequest(spec.vram_mb, spec.min_tier, old.tensor_parallel_size, old.pipeline_parallel_size)
        try:
            plan = place(request, nodes, reservations, now)
            cluster = allocate(conn, settings) if plan.multi_node else None
        except PlacementError:
            continue
        catalog.replace_instance(conn, row["id"], plan, plan_record(plan, cluster), "placed again after " + row["error"])
        placed.append({"id": row["id"], "model": row["model"], "nodes": list(plan.node_ids)})
    return placed


def plan_record(plan: ParallelismPlan, cluster: RayCluster | None) -> dict:
    """The plan as an instance row keeps it: with its Ray cluster when it spans nodes."""
    record = plan.to_dict()
    if cluster is not None:
        record["ray"] = cluster.to_dict()
    return record


def reconcile_multi_node(engine: Engine, settings: Settings) -> dict[str, int]:
    """One reconciler pass: take down the instances that lost a member, then place them again."""
    from nexus.nodes.reservations import fleet, live_reservations

    with engine.begin() as conn:
        lost = fail_lost_members(conn)
    with engine.begin() as conn:
        placed = replace_failed(conn, settings, datetime.now(timezone.utc),
                                lambda c: (fleet(c, True), live_reservations(c)))
    return {"instances_member_lost": len(lost), "instances_placed_again": len(placed)}
