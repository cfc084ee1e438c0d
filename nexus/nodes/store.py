"""The master's registry of nodes: registration, heartbeats and the admin's actions, one SQL statement each.

The state rules are the pure functions of `nexus.nodes.states`; the CASE
expressions here apply the same rules inside the UPDATE so that a heartbeat
costs one round trip (a test checks SQL and Python agree for every state).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from nexus.nodes.hardware import NodeHardware
from nexus.nodes.schemas import HeartbeatRequest, NodePatch, RegisterRequest
from nexus.nodes.tiers import TierThresholds, classify_node, gpu_tiers
from nexus.auth import hash_token

# Every column but the token hash: what the admin API shows.
NODE_COLUMNS = ("id", "name", "state", "drain_requested", "tier", "gpu_tiers", "queues", "gpu_count",
                "vram_total_mb", "hardware", "resources", "running_jobs", "loaded_models", "workers", "labels",
                "max_concurrent", "agent_version", "consecutive_failures", "registered_at", "last_heartbeat_at",
                "state_changed_at")
_SELECT = ", ".join(NODE_COLUMNS)


class NodeNameTaken(Exception):
    """Another live node already has this name."""


@dataclass(frozen=True)
class HeartbeatAnswer:
    state: str
    drain_requested: bool
    max_concurrent: int | None
    labels: dict

    def to_dict(self) -> dict:
        return {"state": self.state, "drain_requested": self.drain_requested,
                "max_concurrent": self.max_concurrent, "labels": self.labels}


# --- registration ----------------------------------------------------------------------------

# A machine that was re-installed comes back under its old name with a new identity: an offline
# namesake is retired (removed) so the name is free; a live namesake keeps it.
# A namesake that is offline is a node coming back under a new identity. One still `registering`
# for longer than UNANSWERED_REGISTRATION_SECONDS never heard its answer: the agent's register
# timed out (NEXUS_AGENT_REQUEST_TIMEOUT_SECONDS, 10 s) after the master created the row (a slow,
# loaded master), and the agent, holding no token for that row, asks again. Both give way to the
# new registration, so retrying a register is safe; a namesake registering right now keeps its name.
UNANSWERED_REGISTRATION_SECONDS = 5.0
_RETIRE_OFFLINE_NAMESAKE = text(
    "UPDATE nodes SET state = 'removed', state_changed_at = now() WHERE name = :name AND (state = 'offline' "
    f"OR state = 'registering' AND registered_at < now() - interval '{UNANSWERED_REGISTRATION_SECONDS} seconds')")

_INSERT_NODE = text(
    f"""INSERT INTO nodes (id, name, token_hash, state, tier, gpu_tiers, queues, gpu_count, vram_total_mb,
                           hardware, labels, agent_version, join_token_id)
        VALUES (:id, :name, :token_hash, 'registering', :tier, :gpu_tiers, :queues, :gpu_count, :vram_total_mb,
                :hardware, :labels, :agent_version, :join_token_id)
        ON CONFLICT (name) WHERE state <> 'removed' DO NOTHING
        RETURNING {_SELECT}"""
).bindparams(bindparam("gpu_tiers", type_=JSONB), bindparam("hardware", type_=JSONB),
             bindparam("labels", type_=JSONB))


def register(conn: Connection, request: RegisterRequest, hardware: NodeHardware, thresholds: TierThresholds,
             node_token: str, join_token_id: uuid.UUID | None = None) -> dict:
    """Insert the node in state `registering`; the tier is the master's own classification of the hardware."""
    conn.execute(_RETIRE_OFFLINE_NAMESAKE, {"name": request.name})
    row = conn.execute(_INSERT_NODE, {
        "id": uuid.uuid4(), "name": request.name, "token_hash": hash_token(node_token),
        "tier": classify_node(hardware, thresholds).value,
        "gpu_tiers": {str(index): tier.value for index, tier in gpu_tiers(hardware, thresholds).items()},
        "queues": list(dict.fromkeys(request.queues)), "gpu_count": len(hardware.gpus),
        "vram_total_mb": hardware.vram_total_mb, "hardware": hardware.to_dict(), "labels": request.labels,
        "agent_version": request.agent_version, "join_token_id": join_token_id,
    }).mappings().first()
    if row is None:
        raise NodeNameTaken(request.name)
    return dict(row)


# --- heartbeats ------------------------------------------------------------------------------

# states.state_on_heartbeat, in SQL: quarantine holds until an admin clears it; otherwise the
# admin's drain wish or the agent's own shutdown makes it draining, anything else ready.
# A beat is liveness, not a record anyone was promised, so its commit does not wait for the WAL
# flush: a crash may lose the last beats, which the next ones replace (claims in lifecycle do the same).
_HEARTBEAT = text(
    """
    SET LOCAL synchronous_commit = off;
    WITH cur AS (
        SELECT id, state FROM nodes WHERE id = :id AND token_hash = :token_hash AND state <> 'removed' FOR UPDATE
    ),
    next AS (
        SELECT cur.id, cur.state AS old_state,
               CASE WHEN cur.state = 'quarantined' THEN 'quarantined'
                    WHEN n.drain_requested OR :agent_draining THEN 'draining'
                    ELSE 'ready' END AS new_state
        FROM cur JOIN nodes n ON n.id = cur.id
    )
    UPDATE nodes n SET
        state = next.new_state,
        state_changed_at = CASE WHEN next.new_state <> next.old_state THEN now() ELSE n.state_changed_at END,
        last_heartbeat_at = now(), resources = :resources, running_jobs = :running_jobs,
        loaded_models = :loaded_models, workers = :workers,
        agent_version = coalesce(nullif(:agent_version, ''), n.agent_version)
    FROM next WHERE n.id = next.id
    RETURNING n.state, n.drain_requested, n.max_concurrent, n.labels
    """
).bindparams(bindparam("resources", type_=JSONB), bindparam("workers", type_=JSONB))

# The agent's last word after draining: whatever it still held is re-queued now, not when its leases run out.
_STOPPED = text(
    """UPDATE nodes SET state = CASE WHEN state = 'quarantined' THEN state ELSE 'offline' END,
              state_changed_at = now(), last_heartbeat_at = now(), running_jobs = '{}', workers = '[]'
       WHERE id = :id AND token_hash = :token_hash AND state <> 'removed'
       RETURNING name, state, drain_requested, max_concurrent, labels"""
)


def heartbeat(conn: Connection, node_id: uuid.UUID, node_token: str, beat: HeartbeatRequest) -> HeartbeatAnswer | None:
    """Record a beat; None when the token does not belong to this node or the node was removed."""
    params = {"id": node_id, "token_hash": hash_token(node_token)}
    if beat.state == "stopped":
        row = conn.execute(_STOPPED, params).first()
        if row is not None:
            forfeit_leases(conn, [row.name])
    else:
        row = conn.execute(_HEARTBEAT, {
            **params, "agent_draining": beat.state == "draining",
            "resources": beat.resources.model_dump(), "running_jobs": beat.running_jobs,
            "loaded_models": beat.loaded_models, "workers": json.loads(json.dumps(beat.workers, default=str)),
            "agent_version": beat.agent_version,
        }).first()
    return None if row is None else HeartbeatAnswer(row.state, row.drain_requested, row.max_concurrent, row.labels)


def forfeit_leases(conn: Connection, node_names: list[str]) -> int:
    """End the leases of jobs running on these nodes now: the reconciler's next pass re-queues them
    exactly as it does for any expired lease (retrying, or failed when attempts are exhausted)."""
    if not node_names:
        return 0
    result = conn.execute(
        text("""UPDATE jobs SET lease_expires_at = now() - interval '1 millisecond'
                WHERE state = 'running' AND node = ANY(:names)"""), {"names": list(node_names)})
    return result.rowcount


# --- reading -----------------------------------------------------------------------------------

def get_node(conn: Connection, node_id: uuid.UUID) -> dict | None:
    row = conn.execute(text(f"SELECT {_SELECT} FROM nodes WHERE id = :id"), {"id": node_id}).mappings().first()
    return dict(row) if row else None


def list_nodes(conn: Connection, tier: str | None = None, state: str | None = None, has_gpu: bool | None = None,
               model: str | None = None) -> list[dict]:
    """Nodes matching every filter given, by tier then name. Removed nodes only when asked for by state."""
    where, params = ["state <> 'removed'" if state is None else "state = :state"], {"state": state}
    if tier is not None:
        where.append("tier = :tier")
        params["tier"] = tier
    if has_gpu is not None:
        where.append("gpu_count > 0" if has_gpu else "gpu_count = 0")
    if model is not None:
        where.append(":model = ANY(loaded_models)")
        params["model"] = model
    rows = conn.execute(text(f"SELECT {_SELECT} FROM nodes WHERE {' AND '.join(where)} ORDER BY tier, name"),
                        params).mappings()
    return [dict(row) for row in rows]


def resolve_node_ids(conn: Connection, references: list[str]) -> dict[str, str | None]:
    """Each reference (a node's id or its name) to the id of the live node it names; None where none does.
    A name is unique among nodes that are not removed (registration keeps it so)."""
    rows = conn.execute(text("SELECT id::text AS id, name FROM nodes WHERE state <> 'removed' "
                             "AND (id::text = ANY(:refs) OR name = ANY(:refs))"), {"refs": references}).all()
    by_reference = {**{row.name: row.id for row in rows}, **{row.id: row.id for row in rows}}
    return {reference: by_reference.get(reference) for reference in references}


# --- the admin's actions ---------------------------------------------------------------------------

class NodeRemoved(Exception):
    """The node was removed; nothing changes it any more."""


def _admin_update(conn: Connection, node_id: uuid.UUID, sets: str, params: dict | None = None) -> dict | None:
    current = conn.execute(text("SELECT state FROM nodes WHERE id = :id FOR UPDATE"), {"id": node_id}).first()
    if current is None:
        return None
    if current.state == "removed":
        raise NodeRemoved(str(node_id))
    row = conn.execute(text(f"UPDATE nodes SET {sets} WHERE id = :id RETURNING {_SELECT}"),
                       {"id": node_id, **(params or {})}).mappings().first()
    return dict(row)


_NEW_STATE = "state_changed_at = CASE WHEN state <> {new} THEN now() ELSE state_changed_at END, state = {new}"


def request_drain(conn: Connection, node_id: uuid.UUID) -> dict | None:
    """A live node drains at once; a silent one drains when it comes back (drain_requested remembers)."""
    new = "CASE WHEN state IN ('registering', 'ready') THEN 'draining' ELSE state END"
    return _admin_update(conn, node_id, "drain_requested = true, " + _NEW_STATE.format(new=new))


def resume(conn: Connection, node_id: uuid.UUID) -> dict | None:
    """Undo a drain, or clear a quarantine (its failure streak starts again from zero)."""
    new = "CASE WHEN state IN ('draining', 'quarantined') THEN 'ready' ELSE state END"
    return _admin_update(conn, node_id, "drain_requested = false, consecutive_failures = 0, "
                         + _NEW_STATE.format(new=new))


def remove(conn: Connection, node_id: uuid.UUID) -> dict | None:
    """Removed is final: the node token stops working, reservations go, running jobs are re-queued."""
    current = conn.execute(text("SELECT name, state FROM nodes WHERE id = :id FOR UPDATE"), {"id": node_id}).first()
    if current is None:
        return None
    if current.state != "removed":
        conn.execute(text("DELETE FROM gpu_reservations WHERE node_id = :id"), {"id": node_id})
        conn.execute(text("UPDATE nodes SET state = 'removed', state_changed_at = now() WHERE id = :id"),
                     {"id": node_id})
        forfeit_leases(conn, [current.name])
    return get_node(conn, node_id)


def remove_registered_with(conn: Connection, token_id: uuid.UUID) -> int:
    """Remove every live node that registered with this (revoked) token; returns how many."""
    ids = [r[0] for r in conn.execute(text(
        "SELECT id FROM nodes WHERE join_token_id = :t AND state <> 'removed'"), {"t": token_id})]
    for node_id in ids:
        remove(conn, node_id)
    return len(ids)


def patch(conn: Connection, node_id: uuid.UUID, changes: NodePatch) -> dict | None:
    sets, params = [], {}
    if "labels" in changes.model_fields_set:
        sets.append("labels = CAST(:labels AS jsonb)")
        params["labels"] = json.dumps(changes.labels or {})
    if "max_concurrent" in changes.model_fields_set:
        sets.append("max_concurrent = :max_concurrent")
        params["max_concurrent"] = changes.max_concurrent
    if not sets:
        return _admin_update(conn, node_id, "state = state")
    return _admin_update(conn, node_id, ", ".join(sets), params)
