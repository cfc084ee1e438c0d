"""The cluster at a glance: nodes, GPUs and VRAM by tier, queue depths, jobs by state."""

from __future__ import annotations

from apiflask import APIBlueprint
from sqlalchemy import Connection, text

from nexus.api.security import require, services
from nexus.api.answers import ClusterView
from nexus.auth import Role
from nexus.jobs.states import ACTIVE_STATES, CLAIMABLE_STATES, sql_in
from nexus.queueing.broker import queue_depth
from nexus.queueing.tiers import TIER_ORDER

bp = APIBlueprint("cluster", __name__, url_prefix="/api/v1/cluster", tag="Cluster")

# Free VRAM counts only on nodes that take work, as reported by their last heartbeat.
_BY_TIER_AND_STATE = text(
    """SELECT n.tier, n.state, count(*) AS nodes, sum(n.gpu_count) AS gpus, sum(n.vram_total_mb) AS vram_total_mb,
              sum(CASE WHEN n.state = 'ready' THEN coalesce(b.free, 0) ELSE 0 END) AS vram_free_mb
       FROM nodes n
       LEFT JOIN LATERAL (SELECT sum((g ->> 'memory_free_mb')::bigint) AS free
                          FROM jsonb_array_elements(coalesce(n.resources -> 'gpus', '[]'::jsonb)) g) b ON true
       WHERE n.state <> 'removed'
       GROUP BY n.tier, n.state"""
)
_RESERVED_BY_TIER = text(
    """SELECT n.tier, sum(r.memory_mb) FROM gpu_reservations r JOIN nodes n ON n.id = r.node_id
       WHERE r.expires_at > now() GROUP BY n.tier"""
)


def tier_totals(conn: Connection) -> dict[str, dict]:
    totals = {tier.value: {"nodes": 0, "nodes_by_state": {}, "gpus": 0, "vram_total_mb": 0, "vram_free_mb": 0,
                           "vram_reserved_mb": 0} for tier in TIER_ORDER}
    for row in conn.execute(_BY_TIER_AND_STATE):
        tier = totals[row.tier]
        tier["nodes"] += row.nodes
        tier["nodes_by_state"][row.state] = row.nodes
        tier["gpus"] += int(row.gpus or 0)
        tier["vram_total_mb"] += int(row.vram_total_mb or 0)
        tier["vram_free_mb"] += int(row.vram_free_mb or 0)
    for tier, reserved in conn.execute(_RESERVED_BY_TIER):
        totals[tier]["vram_reserved_mb"] = int(reserved)
    return totals


def job_counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(text(f"SELECT state, count(*) FROM jobs WHERE {sql_in('state', ACTIVE_STATES)} GROUP BY state"))
    return {**dict.fromkeys(ACTIVE_STATES, 0), **{state: count for state, count in rows}}


@bp.get("")
@bp.output(ClusterView)
@bp.doc(security="bearer")
@require(Role.SUBMITTER)
def cluster():
    s = services()
    with s.engine.connect() as conn:
        tiers = tier_totals(conn)
        jobs = job_counts(conn)
        waiting = {row[0] for row in conn.execute(text(
            f"SELECT DISTINCT queue FROM jobs WHERE {sql_in('state', CLAIMABLE_STATES)}"))}
    queues = {queue: queue_depth(s.redis, queue) for queue in sorted(waiting | {t.queue for t in TIER_ORDER})}
    totals = {key: sum(t[key] for t in tiers.values())
              for key in ("nodes", "gpus", "vram_total_mb", "vram_free_mb", "vram_reserved_mb")}
    return {"tiers": tiers, "totals": totals, "queues": queues, "jobs": jobs}
