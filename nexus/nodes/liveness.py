"""The master's side of node liveness and failures, run by the reconciler on every pass.

    silent past node_stale_after_seconds    -> stale
    silent past node_offline_after_seconds  -> offline: no new work is placed there
    failure streak >= node_quarantine_after_failures -> quarantined (until an admin resumes it)

The streak counts infrastructure failures only (lease expiries, the engine or backend failing):
a job's own failure is not the node's (nexus.jobs.failures, migration 0005).

The same rules as `states.liveness_state`, applied to all nodes in one
statement each (a test checks SQL and Python agree).

Going offline does not end the node's leases. A missed heartbeat says the agent
could not reach the API (a stalled or restarting API, a long-poll flood), not
that the work stopped: the workers renew their leases in PostgreSQL themselves,
and a lease ends when nobody renews it (the reconciler's lease pass, within
job_lease_seconds of a worker's death). Forfeiting here once cost a healthy
240 s job its attempt while its worker renewed the lease the whole time. The
fast paths stay where the evidence is certain: the agent's goodbye and an
admin's remove (nexus.nodes.store).
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, text

from nexus.config import Settings

log = logging.getLogger(__name__)

# Offline first, so a node silent past both thresholds (the reconciler itself was down) goes straight there.
_MARK_OFFLINE = text(
    """UPDATE nodes SET state = 'offline', state_changed_at = now()
       WHERE state IN ('registering', 'ready', 'draining', 'stale')
         AND last_heartbeat_at < now() - make_interval(secs => :offline_after)
       RETURNING name"""
)
_MARK_STALE = text(
    """UPDATE nodes SET state = 'stale', state_changed_at = now()
       WHERE state IN ('registering', 'ready', 'draining')
         AND last_heartbeat_at < now() - make_interval(secs => :stale_after)
       RETURNING name"""
)
_QUARANTINE = text(
    """UPDATE nodes SET state = 'quarantined', state_changed_at = now()
       WHERE state IN ('ready', 'draining') AND consecutive_failures >= :threshold
       RETURNING name, consecutive_failures"""
)


def reconcile_nodes(engine: Engine, settings: Settings) -> dict[str, int]:
    """One pass over every node's liveness and failure streak; leases are the reconciler's own pass."""
    with engine.begin() as conn:
        offline = [row.name for row in conn.execute(
            _MARK_OFFLINE, {"offline_after": settings.node_offline_after_seconds})]
        stale = [row.name for row in conn.execute(_MARK_STALE, {"stale_after": settings.node_stale_after_seconds})]
        quarantined = conn.execute(_QUARANTINE, {"threshold": settings.node_quarantine_after_failures}).all()
    for name in stale:
        log.warning("node %s missed its heartbeats: stale", name)
    for name in offline:
        log.warning("node %s is offline; its jobs keep running while their leases are renewed", name)
    for row in quarantined:
        log.warning("node %s failed %d jobs in a row: quarantined until an admin resumes it",
                    row.name, row.consecutive_failures)
    return {"nodes_stale": len(stale), "nodes_offline": len(offline), "nodes_quarantined": len(quarantined)}
