"""Claim-time placement: a retried job declines a node where it already failed.

Celery hands a message to whichever worker asks first, so the choice is made
when a worker is about to claim a retry (attempt > 1; a first attempt has
failed nowhere, so it costs nothing). The worker declines when the job failed
on its node before, another ready node that has not failed it consumes the
job's queue, and the job has not waited longer than
`node_avoid_failed_seconds` (better a repeat on the same node than no run).
A declined message is published again after a short delay; Redis serves the
worker that has waited longest first, so an idle eligible node takes it.
"""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy import Engine

from nexus.db.functions import DefinerFunction
from nexus.jobs.failures import may_claim
from nexus.config import Settings
from nexus.jobs.states import CLAIMABLE_STATES, sql_in
from nexus.queueing.message import JobMessage

log = logging.getLogger(__name__)

# The job, whether it is still inside the window, and the ready nodes that consume its queue.
RETRY_CONTEXT = DefinerFunction(
    "nexus_w_retry_context", {"id": "uuid", "attempt": "int", "window": "float8"},
    {"queue": "jobs.queue%TYPE", "priority": "jobs.priority%TYPE", "failed_nodes": "jobs.failed_nodes%TYPE",
     "within_window": "boolean", "eligible": "text[]"},
    """SELECT j.queue, j.priority, j.failed_nodes,
              j.updated_at > now() - make_interval(secs => :window),
              ARRAY(SELECT n.name::text FROM nodes n WHERE n.state = 'ready' AND j.queue = ANY(n.queues))
       FROM jobs j
       WHERE j.id = :id AND """ + sql_in("j.state", CLAIMABLE_STATES) + """ AND j.attempt = :attempt - 1""")


def decline_retry(engine: Engine, celery: Celery, settings: Settings, job_id: str, attempt: int, node: str) -> bool:
    """True when this node should not run this attempt; the message was then published again."""
    if attempt <= 1:
        return False
    with engine.connect() as conn:
        rows = RETRY_CONTEXT.execute(conn, {"id": job_id, "attempt": attempt,
                                            "window": settings.node_avoid_failed_seconds})
    row = rows[0] if rows else None
    if row is None or not row["within_window"] or may_claim(node, row["failed_nodes"], row["eligible"]):
        return False
    JobMessage(job_id, attempt, row["queue"], row["priority"]).publish(
        celery, countdown=settings.declined_job_delay_seconds)
    log.info("job %s attempt %s already failed on %s; left for another node", job_id, attempt, node)
    return True
