"""The reconciler: makes the broker agree with PostgreSQL again after anything went wrong.

Each pass:
1. expires leases of running jobs whose worker stopped renewing them (dead,
   frozen, partitioned): the attempt counts as failed; `retrying` if attempts
   remain, else `failed` (or `cancelled` if cancellation was requested);
2. publishes retrying jobs whose backoff has passed;
3. re-publishes queued jobs whose message is presumed lost: older than
   `requeue_after_seconds`, or sooner when their queue is empty in the broker
   (a restarted or emptied Redis).
Duplicates are harmless: a claim succeeds once per attempt. Several
reconcilers may run; rows are taken with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import threading

import redis
from celery import Celery
from sqlalchemy import Engine, text

from nexus.nodes.liveness import reconcile_nodes
from nexus.config import Settings
from nexus.queueing.message import JobMessage, publish_all
from nexus.queueing.celery_app import PRIORITY_LEVELS, PUBLISH_GIVE_UP_SECONDS

log = logging.getLogger(__name__)

BATCH = 500
# A queued job younger than this is never presumed lost: its message may be on its way, or its
# submitter may still be finding the broker down (and about to delete the row again).
EMPTY_QUEUE_GRACE_SECONDS = 3.0
assert EMPTY_QUEUE_GRACE_SECONDS > PUBLISH_GIVE_UP_SECONDS

_EXPIRE_LEASES = text(
    """
    WITH due AS (
        SELECT id FROM jobs WHERE state = 'running' AND lease_expires_at < now()
        ORDER BY lease_expires_at LIMIT :batch FOR UPDATE SKIP LOCKED
    ),
    upd AS (
        UPDATE jobs j SET
            state = CASE WHEN j.cancel_requested THEN 'cancelled'
                         WHEN j.attempt < j.max_attempts THEN 'retrying' ELSE 'failed' END,
            error = 'lease expired: worker ' || coalesce(j.node, '?') || ' stopped renewing it',
            failed_nodes = array_append(j.failed_nodes, j.node),
            lease_expires_at = NULL, not_before = now(), updated_at = now(),
            finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts THEN now() END
        FROM due WHERE j.id = due.id
        RETURNING j.id, j.state, j.attempt, j.node, j.type
    ),
    ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, node, message)
        SELECT id, 'running', state, attempt, node, 'lease expired' FROM upd
    )
    SELECT * FROM upd
    """
)

_DUE_RETRIES = text(
    """
    WITH due AS (
        SELECT id FROM jobs
        WHERE state = 'retrying' AND NOT cancel_requested AND coalesce(not_before, now()) <= now()
          AND (published_attempt <= attempt OR published_at < now() - make_interval(secs => :stale))
        LIMIT :batch FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs j SET published_attempt = j.attempt + 1, published_at = now()
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.attempt, j.queue, j.priority
    """
)

_LOST_QUEUED = text(
    """
    WITH due AS (
        SELECT id FROM jobs
        WHERE state = 'queued' AND NOT cancel_requested
          AND (published_at < now() - make_interval(secs => :stale)
               OR (queue = ANY(:empty_queues) AND published_at < now() - make_interval(secs => :grace)))
        LIMIT :batch FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs j SET published_at = now()
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.attempt, j.queue, j.priority
    """
)


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Celery Redis queue, summed over its priority lists."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(queue)
    for level in range(1, PRIORITY_LEVELS):
        pipe.llen(f"{queue}:{level}")
    return sum(pipe.execute())


class Reconciler:
    def __init__(self, settings: Settings, engine: Engine, celery: Celery, redis_client: redis.Redis):
        self.settings = settings
        self.engine = engine
        self.celery = celery
        self.redis = redis_client

    def run_once(self) -> dict[str, int]:
        counts = reconcile_nodes(self.engine, self.settings)
        counts["leases_expired"] = self._expire_leases()
        counts["retries_published"] = self._publish(_DUE_RETRIES, {"stale": self.settings.requeue_after_seconds})
        counts["queued_republished"] = self._publish(_LOST_QUEUED, {
            "stale": self.settings.requeue_after_seconds,
            "grace": EMPTY_QUEUE_GRACE_SECONDS,
            "empty_queues": self._empty_queues_with_waiting_jobs(),
        })
        return counts

    def run_forever(self, stop: threading.Event) -> None:
        log.info("reconciler running every %.1fs", self.settings.reconcile_interval_seconds)
        while not stop.is_set():
            try:
                counts = self.run_once()
                if any(counts.values()):
                    log.info("reconciled: %s", counts)
            except Exception as exc:  # a dependency is down: say so and try again next pass
                log.warning("reconcile pass failed: %s", exc)
            stop.wait(self.settings.reconcile_interval_seconds)

    def _expire_leases(self) -> int:
        with self.engine.begin() as conn:
            rows = conn.execute(_EXPIRE_LEASES, {"batch": BATCH}).all()
        for row in rows:
            log.warning("job %s attempt %s on %s lost its lease -> %s", row.id, row.attempt, row.node, row.state)
        return len(rows)

    def _publish(self, statement, params: dict) -> int:
        # Publish inside the transaction: if the broker refuses, the row keeps its old
        # publication marks and the next pass tries again. A worker that receives the
        # message first waits on the row lock, then sees the committed row.
        with self.engine.begin() as conn:
            rows = conn.execute(statement, {"batch": BATCH, **params}).all()
            if rows:
                publish_all(self.celery, [JobMessage(str(r.id), r.attempt + 1, r.queue, r.priority) for r in rows])
        return len(rows)

    def _empty_queues_with_waiting_jobs(self) -> list[str]:
        with self.engine.connect() as conn:
            queues = [r[0] for r in conn.execute(text("SELECT DISTINCT queue FROM jobs WHERE state = 'queued'"))]
        return [q for q in queues if queue_depth(self.redis, q) == 0]

