"""VRAM reservations and the fleet as can-fit sees it: rows in, `nexus.nodes.fit` values out.

A GPU's free VRAM is the one its node's last heartbeat reported (the
registration's when no beat has reported GPUs yet); reservations that have not
expired are subtracted from it by `fit.can_fit`. Reserving locks the node's
row, so two reservations racing for the last gigabytes cannot both succeed.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, text

from nexus.nodes.fit import GpuView, NodeView, Reservation, reserved_mb
from nexus.nodes.schemas import ReservationRequest
from nexus.nodes.states import NodeState
from nexus.queueing.tiers import Tier


class ReservationRefused(Exception):
    """The reservation cannot be made; `details` says why, `status` is the HTTP answer that fits."""

    def __init__(self, message: str, details: dict | None = None, status: int = 409) -> None:
        super().__init__(message)
        self.details = details or {}
        self.status = status


_FLEET_COLUMNS = "id, state, tier, gpu_tiers, hardware -> 'gpus' AS gpus, resources -> 'gpus' AS beat_gpus"


def node_view(row) -> NodeView:
    beat = {gpu["index"]: gpu for gpu in row.beat_gpus or ()}
    gpus = []
    for gpu in row.gpus or ():
        free = beat.get(gpu["index"], gpu)["memory_free_mb"]
        tier = Tier(row.gpu_tiers.get(str(gpu["index"]), Tier.CPU_ONLY.value))
        gpus.append(GpuView(gpu["index"], tier, gpu["memory_total_mb"], free))
    return NodeView(str(row.id), NodeState(row.state), Tier(row.tier), tuple(gpus))


def fleet(conn: Connection, gpu_only: bool = True) -> list[NodeView]:
    """Every node that has a GPU (or any node) and is not removed (can-fit keeps only those that take work)."""
    with_gpu = " AND gpu_count > 0" if gpu_only else ""
    rows = conn.execute(text(f"SELECT {_FLEET_COLUMNS} FROM nodes WHERE state <> 'removed'{with_gpu}"))
    return [node_view(row) for row in rows]


def live_reservations(conn: Connection, node_id: uuid.UUID | None = None) -> list[Reservation]:
    where = "expires_at > now()" + (" AND node_id = :node_id" if node_id else "")
    rows = conn.execute(text(f"SELECT id, node_id, gpu_index, memory_mb, expires_at FROM gpu_reservations "
                             f"WHERE {where}"), {"node_id": node_id})
    return [Reservation(str(r.id), str(r.node_id), r.gpu_index, r.memory_mb, r.expires_at) for r in rows]


def list_reservations(conn: Connection) -> list[dict]:
    rows = conn.execute(text("SELECT * FROM gpu_reservations WHERE expires_at > now() ORDER BY created_at"))
    return [dict(row._mapping) for row in rows]


def reserve(conn: Connection, request: ReservationRequest, owner: str) -> dict:
    """Hold `memory_mb` on one GPU until the reservation expires or is released."""
    try:
        node_id = uuid.UUID(request.node_id)
    except ValueError:
        raise ReservationRefused(f"node_id {request.node_id!r} is not a node id", {"field": "node_id"}, 400) from None
    row = conn.execute(text(f"SELECT {_FLEET_COLUMNS} FROM nodes WHERE id = :id FOR UPDATE"), {"id": node_id}).first()
    if row is None:
        raise ReservationRefused(f"node {node_id} not found", {"field": "node_id"}, 404)
    node = node_view(row)
    if not node.state.takes_work:
        raise ReservationRefused(f"node {node_id} is {node.state.value}; only ready nodes take reservations",
                                 {"state": node.state.value})
    gpu = next((g for g in node.gpus if g.index == request.gpu_index), None)
    if gpu is None or gpu.tier is Tier.CPU_ONLY:
        raise ReservationRefused(f"node {node_id} has no usable GPU {request.gpu_index}", {"field": "gpu_index"}, 400)
    now = datetime.now(timezone.utc)
    held = reserved_mb(live_reservations(conn, node_id), now).get((str(node_id), gpu.index), 0)
    available = gpu.memory_free_mb - held
    if request.memory_mb > available:
        raise ReservationRefused(f"GPU {gpu.index} of node {node_id} has {available} MB available",
                                 {"available_mb": available, "requested_mb": request.memory_mb})
    conn.execute(text("DELETE FROM gpu_reservations WHERE expires_at <= now()"))
    created = conn.execute(text(
        """INSERT INTO gpu_reservations (id, node_id, gpu_index, memory_mb, owner, note, expires_at)
           VALUES (:id, :node_id, :gpu_index, :memory_mb, :owner, :note, :expires_at) RETURNING *"""),
        {"id": uuid.uuid4(), "node_id": node_id, "gpu_index": gpu.index, "memory_mb": request.memory_mb,
         "owner": owner, "note": request.note, "expires_at": now + timedelta(seconds=request.ttl_seconds)}).first()
    return dict(created._mapping)


def release(conn: Connection, reservation_id: uuid.UUID) -> bool:
    result = conn.execute(text("DELETE FROM gpu_reservations WHERE id = :id"), {"id": reservation_id})
    return result.rowcount == 1
