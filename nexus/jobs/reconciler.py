"""The reconciler: makes the broker agree with PostgreSQL again after anything went wrong.

Each pass:
1. expires leases of running jobs whose worker stopped renewing them (dead,
   frozen, partitioned): the attempt counts as failed; `retrying` if attempts
   remain, else `failed` (or `cancelled` if cancellation was requested). An
   unrenewed lease is the node failing, never the job: the event says
   'infrastructure' and counts toward the node's quarantine (nexus.jobs.failures);
2. publishes held jobs (nexus.jobs.fairshare): retrying jobs whose backoff has passed, and
   queued jobs past their tenant's share of a queue once it has room again;
3. re-publishes waiting jobs (queued, or retrying with their retry published) whose
   message is gone, on evidence, never on age alone:
   - the broker epoch (`nexus:broker-epoch`, set by the reconciler) is missing: the
     broker lost its data (restarted without persistence, FLUSHALL), so every waiting
     job older than the grace is re-published, then a new epoch is set. An epoch
     other than the one remembered was set by another reconciler that recovered; it
     is adopted. (The very first pass on a new deployment finds no epoch either and
     re-publishes once.)
   - a queue holds fewer messages (its priority lists plus those workers hold
     unacknowledged for a waiting job: prefetched, or delayed by a countdown; not
     a running job's, acknowledged only at its end) than it has waiting jobs
     older than the grace, in two passes running: the queue is read to find which
     jobs have no message, and those are re-published, oldest first, no more than
     the shortfall. This recovers a crashed publisher (row, no message), a lost
     message, and a message a worker dropped without claiming it.
   Why not age: a backlog on a queue nobody consumes yet (waiting for GPUs) kept all
   its messages, and re-publishing each job every interval piled up duplicates (500
   jobs: 9,000 messages in 2 minutes) until Redis, at noeviction, refused submissions.
   The count can be masked (a duplicate or a stale message stands in for a lost one)
   until those are consumed; it never adds a message for a job that has one.
4. deletes finished work past its retention period, a bounded batch (nexus/jobs/retention.py).
Duplicates are harmless: a claim succeeds once per attempt. Several
reconcilers may run; rows are taken with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable, Sequence

import redis
from celery import Celery
from sqlalchemy import Connection, Engine, TextClause, text

from nexus.jobs import fairshare
from nexus.jobs.retention import retention_pass
from nexus.nodes.liveness import reconcile_nodes
from nexus.config import Settings
from nexus.queueing import broker
from nexus.queueing.broker import queue_depth  # noqa: F401  (where callers have long found it)
from nexus.queueing.message import JobMessage, publish_all
from nexus.queueing.celery_app import PUBLISH_GIVE_UP_SECONDS

log = logging.getLogger(__name__)

BATCH = 500
# A waiting job younger than this is never presumed lost: its message may be on its way, or its
# submitter may still be finding the broker down (and about to delete the row again).
GRACE_SECONDS = 3.0
assert GRACE_SECONDS > PUBLISH_GIVE_UP_SECONDS

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
        INSERT INTO job_events (job_id, from_state, to_state, attempt, node, message, failure_kind)
        SELECT id, 'running', state, attempt, node, 'lease expired', 'infrastructure' FROM upd
    )
    SELECT * FROM upd
    """
)

# A waiting job has a message out for attempt + 1: queued ones once published (at submission, or
# later when held past their tenant's share), retrying ones once their retry was published
# (published_attempt moved past attempt). Held jobs have no message, so none is missing.
_WAITING = f"{fairshare.published('jobs')} AND NOT cancel_requested"

_WAITING_PUBLISHED_BEFORE = text(
    f"""
    WITH due AS (
        SELECT id FROM jobs WHERE {_WAITING} AND published_at < :before - make_interval(secs => :grace)
        LIMIT :batch FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs j SET published_at = now()
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.attempt, j.queue, j.priority
    """
)

_OLD_WAITING_BY_QUEUE = text(
    f"""SELECT queue, count(*) FROM jobs
        WHERE {_WAITING} AND published_at < now() - make_interval(secs => :grace) GROUP BY queue"""
)

_OLD_WAITING_OF_QUEUE = text(
    f"""SELECT id, attempt FROM jobs
        WHERE {_WAITING} AND queue = :queue AND published_at < now() - make_interval(secs => :grace)
        ORDER BY published_at"""
)

_OLD_WAITING_AMONG = text(
    f"""SELECT id, attempt, queue FROM jobs
        WHERE id = ANY(CAST(:ids AS uuid[])) AND {_WAITING} AND published_at < now() - make_interval(secs => :grace)"""
)

_REPUBLISH = text(
    f"""
    WITH due AS (SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND {_WAITING} FOR UPDATE SKIP LOCKED)
    UPDATE jobs j SET published_at = now()
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.attempt, j.queue, j.priority
    """
)


class Reconciler:
    def __init__(self, settings: Settings, engine: Engine, celery: Celery, redis_client: redis.Redis,
                 passes: Sequence[Callable[[], dict[str, int]]] = ()):
        """`passes`: more work for each pass, from the packages above this one (multi-node instances)."""
        self.passes = tuple(passes)
        self.settings = settings
        self.engine = engine
        self.celery = celery
        self.redis = redis_client
        self.epoch: str | None = None
        self._short: dict[str, int] = {}  # queue -> messages it lacked last pass, not yet re-published

    def run_once(self) -> dict[str, int]:
        counts = reconcile_nodes(self.engine, self.settings)
        counts["leases_expired"] = self._expire_leases()
        recovered = self._recover_lost_broker()
        counts["broker_data_lost"] = int(recovered is not None)
        # Held jobs: due retries, and queued jobs past their tenant's share that now have room.
        counts["retries_published"] = fairshare.refill_all(self.engine, self.celery, self.settings)
        counts["queued_republished"] = (recovered or 0) + self._republish_missing()
        for extra in self.passes:
            counts.update(extra())
        counts.update(retention_pass(self.engine, self.settings))  # last: finished work, old enough to go
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

    def _publish(self, statement: TextClause, params: dict[str, Any]) -> int:
        # Publish inside the transaction: if the broker refuses, the row keeps its old
        # publication marks and the next pass tries again. A worker that receives the
        # message first waits on the row lock, then sees the committed row.
        with self.engine.begin() as conn:
            rows = conn.execute(statement, {"batch": BATCH, **params}).all()
            if rows:
                publish_all(self.celery, [JobMessage(str(r.id), r.attempt + 1, r.queue, r.priority) for r in rows])
        return len(rows)

    def _recover_lost_broker(self) -> int | None:
        """With no epoch in the broker: re-publish every waiting job, then set one. None if it had one."""
        current = broker.read_epoch(self.redis)
        if current is not None:
            self.epoch = current
            return None
        log.warning("broker epoch %s is gone: the broker lost its data; re-publishing waiting jobs", self.epoch)
        with self.engine.connect() as conn:
            began = conn.execute(text("SELECT now()")).scalar()
        total = 0  # in batches; each re-published row's published_at moves past `began`
        while n := self._publish(_WAITING_PUBLISHED_BEFORE, {"before": began, "grace": GRACE_SECONDS}):
            total += n
        self.epoch = broker.start_epoch(self.redis)
        self._short = {}
        return total

    def _republish_missing(self) -> int:
        """Per queue: re-publish the jobs without a message, when fewer messages than waiting jobs were
        counted in this pass and the last (one count can catch a message between list and hash)."""
        # The broker is read before the rows: a job claimed and acknowledged in between then shows
        # as a message without a waiting row (harmless), not as a waiting row without a message.
        queues = self._queues_with_waiting_jobs()
        depths = {queue: broker.queue_depth(self.redis, queue) for queue in queues}
        held = broker.held_jobs(self.redis)
        with self.engine.connect() as conn:
            waiting: dict[str, int] = dict(conn.execute(_OLD_WAITING_BY_QUEUE, {"grace": GRACE_SECONDS}).all())
            held_waiting = self._held_for_waiting_jobs(conn, held)
        short: dict[str, int] = {}
        total = 0
        for queue, jobs in waiting.items():
            missing = jobs - depths.get(queue, 0) - held_waiting[queue]
            if missing <= 0:
                continue
            confirmed = min(missing, self._short.get(queue, 0))
            total += self._republish_lost(queue, confirmed) if confirmed else 0
            short[queue] = missing - confirmed
        self._short = short
        return total

    @staticmethod
    def _held_for_waiting_jobs(conn: Connection, held: dict[str, set[tuple[str, int]]]) -> Counter[str]:
        """Per queue, the held messages that stand for one of the waiting jobs counted: a message a worker
        holds for a job it runs (acknowledged only at the end) is no waiting job's. Counting those too
        let a busy queue's running jobs mask lost messages for as long as the queue stayed busy (a retry
        whose message a frozen worker's pending fetch took waited out the whole load)."""
        pairs = {pair for jobs in held.values() for pair in jobs}
        if not pairs:
            return Counter()
        rows = conn.execute(_OLD_WAITING_AMONG, {"ids": sorted({job_id for job_id, _ in pairs}),
                                                  "grace": GRACE_SECONDS}).all()
        return Counter(r.queue for r in rows if (str(r.id), r.attempt + 1) in held.get(r.queue, set()))

    def _queues_with_waiting_jobs(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(text(f"SELECT DISTINCT queue FROM jobs WHERE {_WAITING}"))]

    def _republish_lost(self, queue: str, limit: int) -> int:
        present = broker.job_messages(self.redis, queue)
        with self.engine.connect() as conn:
            rows = conn.execute(_OLD_WAITING_OF_QUEUE, {"queue": queue, "grace": GRACE_SECONDS}).all()
        lost = [str(r.id) for r in rows if (str(r.id), r.attempt + 1) not in present][:limit]
        if lost:
            log.warning("queue %s lacks the messages of %d waiting jobs; re-publishing them", queue, len(lost))
        return self._publish(_REPUBLISH, {"ids": lost}) if lost else 0
