"""Fair shares of a queue: each tenant has at most a few messages waiting in the broker per queue.

A Celery queue on Redis is one FIFO list: a tenant that submitted 10,000 jobs to a tier put
10,000 messages ahead of everyone else's, and another tenant's job waited for all of them. So
a tenant's jobs become messages only while that tenant has fewer than
`Settings.max_broker_messages_per_tenant` of them waiting on the queue (published, not yet
claimed); the others wait as rows — state `queued` (or `retrying`), not yet published
(`published_attempt <= attempt`), which is how a due retry has always waited. A retry is published
as soon as it is due, share or not: its job was admitted once, and the share may be full of messages
a frozen worker holds (its prefetch), which left a lost attempt waiting behind them. Whoever frees a
place publishes the tenant's next held jobs, in priority then submission order:

- the worker that claims one of the tenant's messages, at once (the claim itself tells whether
  the tenant has held jobs on that queue and room for them: `nexus.jobs.lifecycle.claim`);
- the reconciler on every pass, for every tenant and queue with held jobs (due retries,
  manual retries, and whatever a crashed worker did not refill).

Another tenant's job therefore waits behind at most that many messages per other tenant, not
behind their backlog; a tenant alone still fills every worker (running jobs are not capped, only
messages waiting). Refills of one tenant and queue take a transaction-level advisory lock, so two
of them do not both fill the same room; a submission counts without the lock (one statement, the
token path's one write) and may overshoot by what is submitted at the same instant. Nothing is
lost or duplicated either way: a held job is a row the refill or the reconciler publishes, and
publishing marks the row first, inside the transaction that sends the message.
"""

from __future__ import annotations

import logging
import math

from celery import Celery
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from nexus.config import Settings
from nexus.db.functions import DefinerFunction
from nexus.queueing.message import JobMessage, publish_all

log = logging.getLogger(__name__)

# The three conditions, written once: the partial indexes of migration 0009 have the first two as
# their predicates, and PostgreSQL uses a partial index only for a query that repeats its predicate.
WAITING_STATES = "('queued', 'retrying')"


def published(alias: str) -> str:
    """A message is out for the job's next attempt (it waits in the broker or in a worker's hands)."""
    return f"{alias}.state IN {WAITING_STATES} AND {alias}.published_attempt > {alias}.attempt"


def held(alias: str) -> str:
    """Waiting with no message: past the tenant's share, or a retry whose message is not out yet."""
    return f"{alias}.state IN {WAITING_STATES} AND {alias}.published_attempt <= {alias}.attempt"


def ready(alias: str) -> str:
    """A held job that may be published now: its backoff is over (a queued one has none) and nobody
    cancelled it. The backoff is compared as migration 0009's index holds it, so the claim's check finds
    a ready job with one probe, however many of the tenant's retries are still backing off."""
    return (f"{held(alias)} AND NOT {alias}.cancel_requested "
            f"AND coalesce({alias}.not_before, '-infinity'::timestamptz) <= now()")


def published_count(alias: str, tenant: str, queue: str) -> str:
    """SQL: how many of the tenant's jobs have a message out on the queue."""
    return f"(SELECT count(*) FROM jobs {alias} WHERE {alias}.tenant = {tenant} AND {alias}.queue = {queue} " \
           f"AND {published(alias)})"


def has_ready(alias: str, tenant: str, queue: str) -> str:
    """SQL: the tenant has a held job on the queue that may be published now."""
    return f"EXISTS (SELECT 1 FROM jobs {alias} WHERE {alias}.tenant = {tenant} AND {alias}.queue = {queue} " \
           f"AND {ready(alias)})"


LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock wait that reached lock_timeout
RECONCILER_LOCK_WAIT_SECONDS = 1.0  # a refill holds the lock for milliseconds; longer is a stuck holder
BATCH = 500  # jobs one refill publishes at most (the whole room when there is no share)

# One function for the worker that frees a place (the worker role may touch no table: nexus.db.functions)
# and the reconciler alike. The advisory lock comes first, in a statement of its own, so the refill's
# snapshot sees what the lock's previous holder published. :share 0 means no share: publish every ready
# job (up to the batch).
REFILL = DefinerFunction(
    "nexus_w_refill", {"tenant": "text", "queue": "text", "share": "int", "batch": "int"},
    {"id": "jobs.id%TYPE", "attempt": "jobs.attempt%TYPE", "queue": "jobs.queue%TYPE",
     "priority": "jobs.priority%TYPE"}, f"""
    WITH room AS (
        SELECT CASE WHEN :share = 0 THEN :batch
                    ELSE LEAST(:batch, GREATEST(0, :share - {published_count('p', ':tenant', ':queue')})) END AS n
    ),
    -- A retry goes out whatever the share: its job was admitted once, and the share may be full of
    -- messages a frozen worker holds (prefetched), which left the lost attempt waiting behind them.
    retries AS (
        SELECT h.id FROM jobs h WHERE h.tenant = :tenant AND h.queue = :queue AND {ready('h')}
          AND h.state = 'retrying'
        ORDER BY h.priority DESC, h.created_at, h.id LIMIT :batch FOR UPDATE SKIP LOCKED
    ),
    fresh AS (
        SELECT h.id FROM jobs h WHERE h.tenant = :tenant AND h.queue = :queue AND {ready('h')}
          AND h.state = 'queued'
        ORDER BY h.priority DESC, h.created_at, h.id LIMIT (SELECT n FROM room) FOR UPDATE SKIP LOCKED
    ),
    due AS (SELECT id FROM retries UNION ALL SELECT id FROM fresh),
    upd AS (
        UPDATE jobs j SET published_attempt = j.attempt + 1, published_at = now()
        FROM due WHERE j.id = due.id
        RETURNING j.id, j.attempt, j.queue, j.priority
    )
    SELECT * FROM upd""",
    first="PERFORM pg_advisory_xact_lock(hashtextextended(:tenant || chr(31) || :queue, 0))")

# Every (tenant, queue) with held jobs, one index probe each (a loose index scan over the held index):
# a plain DISTINCT would read every held row, 100,000 of them for one large backlog, on every pass.
_HELD_PAIRS = text(f"""
    WITH RECURSIVE pairs AS (
        (SELECT h.tenant, h.queue FROM jobs h WHERE {held('h')} ORDER BY h.tenant, h.queue LIMIT 1)
        UNION ALL
        SELECT next.tenant, next.queue FROM pairs, LATERAL (
            SELECT h.tenant, h.queue FROM jobs h
            WHERE {held('h')} AND (h.tenant, h.queue) > (pairs.tenant, pairs.queue)
            ORDER BY h.tenant, h.queue LIMIT 1) next
    )
    SELECT tenant, queue FROM pairs
""")


def refill(engine: Engine, celery: Celery, settings: Settings, tenant: str, queue: str,
           lock_wait_seconds: float | None = None) -> int:
    """Publish the tenant's next ready jobs on the queue, as many as its share has room for; how many.

    The messages go out inside the transaction that marks the rows: if the broker refuses, the rows
    stay held and the next refill tries again. A worker that gets a message first waits on the row
    lock and then sees the committed row. `lock_wait_seconds`: wait at most this long for the tenant's
    refill lock, then raise RefillBusy (None: as long as it takes)."""
    with engine.begin() as conn:
        if lock_wait_seconds is not None:
            conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"),
                         {"ms": f"{math.ceil(lock_wait_seconds * 1000)}ms"})
        try:
            rows = REFILL.execute(conn, {"tenant": tenant, "queue": queue,
                                         "share": settings.max_broker_messages_per_tenant, "batch": BATCH})
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) == LOCK_NOT_AVAILABLE:
                raise RefillBusy(tenant, queue) from exc
            raise
        if rows:
            publish_all(celery, [JobMessage(str(r["id"]), r["attempt"] + 1, r["queue"], r["priority"]) for r in rows])
    return len(rows)


class RefillBusy(Exception):
    """Another session held the tenant's refill lock past the wait (a refill runs; or its holder froze)."""

    def __init__(self, tenant: str, queue: str):
        super().__init__(f"the refill lock of tenant {tenant!r} on queue {queue!r} is held elsewhere")


def held_pairs(conn: Connection) -> list[tuple[str, str]]:
    return [(r.tenant, r.queue) for r in conn.execute(_HELD_PAIRS)]


def refill_all(engine: Engine, celery: Celery, settings: Settings) -> int:
    """The reconciler's pass: refill every tenant and queue that has held jobs; how many were published.

    A pair whose lock is held elsewhere waits for the next pass: a session that froze holding it (its
    worker stopped between lock and commit, until PostgreSQL ends it: nexus.jobs.worker_role) stalled
    the whole pass, lease expiry included, for as long as it stayed frozen."""
    with engine.connect() as conn:
        pairs = held_pairs(conn)
    total = 0
    for tenant, queue in pairs:
        try:
            while (n := refill(engine, celery, settings, tenant, queue, RECONCILER_LOCK_WAIT_SECONDS)) == BATCH:
                total += n  # no share: drain the due ones
            total += n
        except RefillBusy as busy:
            log.info("%s; it is refilled next pass", busy)
    return total
