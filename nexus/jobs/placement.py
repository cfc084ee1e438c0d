"""Claim-time placement: a retried job declines a node where it already failed.

Celery hands a message to whichever worker asks first, so the choice is made
when a worker is about to claim a retry (attempt > 1; a first attempt has
failed nowhere, so it costs nothing). The worker declines when the job failed
on its node before, another ready node that has not failed it consumes the
job's queue, and the job has not waited longer than
`node_avoid_failed_seconds` (better a repeat on the same node than no run).
A declined message is published again after a short delay; Redis serves the
worker that has waited longest first, so an idle eligible node takes it.

The delay is drawn at random, never fixed. The declining worker received the
delayed message the delay before it comes back, and its consumer blocked on
the queue again at once, so after a fixed delay it has waited exactly that
long. An idle worker blocks anew every `brpop_timeout` (kombu: 1 s), so it has
waited less than that. With the delay at 1 s the declining worker was the
longest waiter nearly every time: in a chaos run one retry came back to the
node that had failed it 102 times in a row, for 100 s, while two other nodes
sat idle. A delay drawn from (d/10, d) with d <= brpop_timeout gives an idle
node the message with a probability of at least 1 - delay/brpop_timeout on
each return (tests/integration/test_agent_liveness.py shows both).
"""

from __future__ import annotations

import logging
import random

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
    delay = settings.declined_job_delay_seconds
    JobMessage(job_id, attempt, row["queue"], row["priority"]).publish(
        celery, countdown=random.uniform(delay / 10, delay))  # not fixed: see the module's doc
    log.info("job %s attempt %s already failed on %s; left for another node", job_id, attempt, node)
    return True
