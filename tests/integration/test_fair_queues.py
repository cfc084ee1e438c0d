"""Tenants' shares of a queue (nexus.jobs.fairshare): one tenant's backlog does not delay another's jobs,
and nothing is lost or duplicated while jobs wait as held rows."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from nexus.jobs import fairshare, lifecycle, worker_role
from nexus.jobs.reconciler import Reconciler
from nexus.queueing import broker
from nexus.services import Services
from tests.support import start_worker, wait_for

pytestmark = pytest.mark.timeout(240)

UNCONSUMED = "gpu_peer"  # no worker of these tests consumes it
SHARE = 4  # the default of Settings.max_broker_messages_per_tenant


def submit(services: Services, tenant: str, count: int, tier: str = UNCONSUMED, **job) -> list[str]:
    raws = [{"type": "noop", "requirements": {"tier": tier}, **job} for _ in range(count)]
    return [str(row.id) for row, _ in services.submitter.submit_many(raws, tenant=tenant)]


def messages(services: Services, queue: str = UNCONSUMED) -> set[tuple[str, int]]:
    return broker.job_messages(services.redis, queue)


def published_rows(services: Services, tenant: str) -> set[tuple[str, int]]:
    with services.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT id, attempt FROM jobs j WHERE tenant = :t AND {fairshare.published('j')}"),
                            {"t": tenant}).all()
    return {(str(r.id), r.attempt + 1) for r in rows}


def take(services: Services, job_id: str, attempt: int = 1):
    """What a worker does with a message: claim it, and refill when the claim says so."""
    with services.engine.begin() as conn:
        claimed = lifecycle.claim(conn, uuid.UUID(job_id), attempt, "test-node", 30.0,
                                  services.settings.max_broker_messages_per_tenant)
    if claimed.refill:
        fairshare.refill(services.engine, services.celery, services.settings, claimed.tenant, claimed.queue)
    return claimed


def test_a_tenant_has_at_most_its_share_of_messages_and_the_rest_wait_as_rows(services):
    assert services.settings.max_broker_messages_per_tenant == SHARE
    backlog = submit(services, "a", 50)
    assert messages(services) == {(job, 1) for job in backlog[:SHARE]}  # in submission order
    other = submit(services, "b", 3)
    assert messages(services) == {(job, 1) for job in backlog[:SHARE] + other}  # b is not behind a's 42
    # A retry of a job past the share, and a priority higher than the backlog's, take the next places.
    urgent = submit(services, "a", 1, priority=7)[0]
    assert (urgent, 1) not in messages(services)
    claimed = take(services, backlog[0])
    assert claimed.refill and (urgent, 1) in messages(services)  # priority first
    take(services, backlog[1])
    assert (backlog[SHARE], 1) in messages(services)  # then submission order
    assert published_rows(services, "a") == {m for m in messages(services) if m[0] not in other} \
        - {(backlog[0], 1), (backlog[1], 1)}  # the claimed ones' messages are gone in a real worker's hands


def test_the_reconciler_publishes_held_jobs_as_room_appears_without_duplicates(services):
    reconciler = Reconciler(services.settings, services.engine, services.celery, services.redis)
    backlog = submit(services, "a", 30)
    for _ in range(3):  # passes with nothing to do: still one message per published job, no more
        reconciler.run_once()
    assert messages(services) == published_rows(services, "a") and len(published_rows(services, "a")) == SHARE
    # Cancelled and claimed-elsewhere jobs free places; nobody refilled them (a worker that crashed after
    # its claim): the reconciler's pass does.
    with services.engine.begin() as conn:
        for job in backlog[:3]:
            lifecycle.request_cancel(conn, job)
    reconciler.run_once()
    assert len(published_rows(services, "a")) == SHARE
    assert {(job, 1) for job in backlog[SHARE:SHARE + 3]} <= messages(services)


def test_broker_loss_republishes_the_published_jobs_and_leaves_held_ones_held(services):
    reconciler = Reconciler(services.settings, services.engine, services.celery, services.redis)
    submit(services, "a", 40)
    submit(services, "b", 2)
    reconciler.run_once()
    before = published_rows(services, "a") | published_rows(services, "b")
    services.redis.flushdb()
    with services.engine.begin() as conn:  # older than the republish grace
        conn.execute(text("UPDATE jobs SET published_at = published_at - interval '1 minute'"))
    reconciler.run_once()
    assert messages(services) == before and len(before) == SHARE + 2


def test_another_tenants_job_finishes_while_a_large_backlog_waits_on_the_same_tier(services, session_dir):
    """With one FIFO queue per tier, tenant b's job waited for all of tenant a's 200 jobs."""
    worker = start_worker(services.settings, session_dir, "fair-worker", ["--queues", "gpu_infra", "-c", "2"])
    try:
        backlog = submit(services, "a", 200, tier="gpu_infra", type="sleep", payload={"seconds": 0.05})
        wait_for(lambda: _finished(services, "a") >= 4, timeout=60, what="the backlog to start")
        [job] = submit(services, "b", 1, tier="gpu_infra")
        wait_for(lambda: _finished(services, "b") == 1, timeout=120, what="tenant b's job")
        done_before_b = _finished(services, "a")
        # b waited behind at most a's share of messages and what the worker already held, not the backlog.
        assert done_before_b < 4 + SHARE + 2 + 20, f"b's job finished after {done_before_b} of a's 200"
        wait_for(lambda: _finished(services, "a") == 200, timeout=180, what="the backlog")
        with services.engine.connect() as conn:
            attempts = conn.execute(text(
                "SELECT count(*) FILTER (WHERE to_state = 'running'), count(DISTINCT job_id) FROM job_events "
                "WHERE to_state = 'running' AND job_id = ANY(CAST(:ids AS uuid[]))"), {"ids": backlog + [job]}).one()
        assert tuple(attempts) == (201, 201)  # every job ran, each once: nothing lost, nothing duplicated
    finally:
        worker.stop()


def _finished(services: Services, tenant: str) -> int:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs WHERE tenant = :t AND state = 'succeeded'"),
                            {"t": tenant}).scalar()


def test_v1_requests_are_not_held_behind_their_tenants_share(services):
    """A /v1 request was admitted against its model's serving slots before it became a job: all are published."""
    raws = [{"type": "completion", "requirements": {"model": "tiny"},
             "payload": {"endpoint": "completions", "body": {"model": "tiny", "prompt": "hi"}}, "max_attempts": 1}
            for _ in range(SHARE * 3)]
    ids = [str(row.id) for row, _ in services.submitter.submit_many(raws, tenant="a", allow_internal=True)]
    assert {(job, 1) for job in ids} <= messages(services, "model.tiny")  # the session's own /v1 tests share it


def _frozen_refill(services: Services, tenant: str, queue: str = UNCONSUMED):
    """A worker's session stopped inside a refill transaction, holding the tenant's refill lock (what a
    worker SIGSTOPped between the lock and its commit leaves behind). Returns (engine, connection)."""
    engine = create_engine(services.settings.worker_database_url, poolclass=NullPool)
    conn = engine.connect()
    conn.begin()
    fairshare.REFILL.execute(conn, {"tenant": tenant, "queue": queue, "share": SHARE, "batch": 1})
    return engine, conn


def _session_open(services: Services, pid: int) -> bool:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).scalar() > 0


def test_a_frozen_workers_refill_lock_stalls_neither_the_reconciler_nor_its_lease_expiry(services):
    """The pass skips a pair whose refill lock another session holds and goes on: here the lease of a
    running job (of another tenant) still expires while the frozen refill holds tenant a's lock."""
    backlog = submit(services, "a", SHARE + 3)  # three held
    running = submit(services, "b", 1)[0]
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, running, 1, "frozen-node", 0.05)
    time.sleep(0.2)  # its lease is over
    engine, frozen = _frozen_refill(services, "a")
    try:
        reconciler = Reconciler(services.settings, services.engine, services.celery, services.redis)
        passes: list[dict[str, int]] = []
        thread = threading.Thread(target=lambda: passes.append(reconciler.run_once()), daemon=True)
        thread.start()
        # Well inside the idle-transaction limit PostgreSQL puts on the worker's sessions (4 s here).
        thread.join(timeout=3)
        assert passes, "the reconciler's pass waited on the frozen session's refill lock"
        # Expired and its retry published, by this pass or the session's reconciler (which the lock held too).
        with services.engine.connect() as conn:
            row = conn.execute(text("SELECT state, published_attempt FROM jobs WHERE id = :id"), {"id": running}).one()
        assert (row.state, row.published_attempt) == ("retrying", 2)  # b's pair was not locked
        assert len(published_rows(services, "a")) == SHARE  # a's held jobs wait for the lock's next pass
    finally:
        frozen.close()
        engine.dispose()
    assert {job for job, _ in published_rows(services, "a")} <= set(backlog)


def test_postgresql_ends_a_worker_session_left_idle_in_a_transaction(services):
    """Past the limit (the job lease, at least twice a publish's give-up) the frozen session is ended,
    its lock freed, and the tenant's held jobs go out again."""
    limit = worker_role.idle_transaction_limit_ms(services.settings) / 1000
    submit(services, "a", SHARE)
    engine, frozen = _frozen_refill(services, "a")
    try:
        pid = frozen.connection.dbapi_connection.get_backend_pid()
        assert frozen.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == f"{int(limit)}s"
        wait_for(lambda: not _session_open(services, pid), timeout=limit + 10, what="the idle session ended")
        with pytest.raises(OperationalError):
            frozen.exec_driver_sql("SELECT 1")
    finally:
        frozen.close()
        engine.dispose()
    submit(services, "a", 2)  # past the share: held until a refill has room
    with services.engine.begin() as conn:  # two of the published ones claimed elsewhere: room for two
        for job, _ in sorted(published_rows(services, "a"))[:2]:
            lifecycle.claim(conn, job, 1, "elsewhere", 30.0)
    assert fairshare.refill(services.engine, services.celery, services.settings, "a", UNCONSUMED,
                            lock_wait_seconds=1.0) == 2
