"""The reconciler re-publishes on evidence that a message is gone, never on age alone.

Real PostgreSQL, Redis and the real Reconciler; the jobs wait on `gpu_peer`, a queue no test
worker consumes, as a backlog waits for GPUs."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from nexus.jobs import lifecycle
from nexus.jobs.reconciler import Reconciler
from nexus.jobs.submit import Submitter
from nexus.queueing import broker

pytestmark = pytest.mark.timeout(120)
QUEUE = "gpu_peer"


# Each test's backlog is one tenant's: without a share, every job of it has a message out (tenants'
# shares, which keep most of such a backlog as held rows, have their own tests: test_fair_queues.py).
UNSHARED = {"max_broker_messages_per_tenant": 0}


def reconciler_for(services, requeue_after: float | None = 0.5) -> Reconciler:
    # The age rule this replaced re-published every `requeue_after` seconds; today's settings ignore it.
    update = UNSHARED if requeue_after is None else {"requeue_after_seconds": requeue_after, **UNSHARED}
    settings = services.settings.model_copy(update=update)
    reconciler = Reconciler(settings, services.engine, services.celery, services.redis)
    reconciler.run_once()  # a running deployment: the broker epoch is set before the backlog comes
    return reconciler


def backlog(services, n: int, age_seconds: float = 5.0) -> list[str]:
    """`n` jobs submitted `age_seconds` ago (past the reconciler's grace), their messages waiting."""
    submitter = Submitter(services.settings.model_copy(update=UNSHARED), services.engine, services.celery)
    rows = submitter.submit_many([{"type": "noop", "requirements": {"tier": "gpu_peer"}}] * n, tenant="default")
    ids = [str(row.id) for row, _ in rows]
    age(services, ids, age_seconds)
    return ids


def age(services, ids: list[str], seconds: float) -> None:
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET published_at = now() - make_interval(secs => :s) "
                          "WHERE id = ANY(CAST(:ids AS uuid[]))"), {"s": seconds, "ids": ids})


def messages(services) -> int:
    return broker.queue_depth(services.redis, QUEUE) + broker.held_by_queue(services.redis)[QUEUE]


def passes(reconciler: Reconciler, n: int, interval: float = 0.0) -> int:
    """Re-publications over `n` passes."""
    total = 0
    for _ in range(n):
        total += reconciler.run_once()["queued_republished"]
        time.sleep(interval)
    return total


def test_a_waiting_backlog_is_not_republished_however_long_it_waits(services):
    reconciler = reconciler_for(services)
    jobs = backlog(services, 200)
    passes(reconciler, 12, interval=0.25)  # ~3 s: six of the old requeue intervals
    assert messages(services) <= 1.05 * len(jobs)


def test_one_deleted_message_gets_exactly_that_job_republished(services):
    reconciler = reconciler_for(services)
    jobs = backlog(services, 50)
    key = next(k for k in broker.priority_keys(QUEUE) if services.redis.llen(k))  # priority 5's list
    raw = services.redis.lindex(key, 17)
    assert services.redis.lrem(key, 1, raw) == 1
    lost = broker._job_of(json.loads(raw))[0]
    assert passes(reconciler, 2) == 1  # counted short twice (one count may catch a message in flight)
    assert broker.job_messages(services.redis, QUEUE) == {(job, 1) for job in jobs}
    assert messages(services) == len(jobs)
    with services.engine.connect() as conn:
        fresh = conn.execute(text("SELECT id::text FROM jobs WHERE published_at > now() - interval '3 seconds'"))
        assert [r[0] for r in fresh] == [lost]
    assert passes(reconciler, 3) == 0


def test_messages_held_by_workers_count_as_present(services):
    """Prefetched and countdown-delayed messages sit in kombu's `unacked` hash until acknowledged."""
    reconciler = reconciler_for(services)
    jobs = backlog(services, 20)
    with services.celery.connection_for_read() as conn:
        channel = conn.default_channel
        held = [channel.basic_get(QUEUE, no_ack=False) for _ in range(5)]  # as a worker's prefetch holds them
        assert all(held) and broker.queue_depth(services.redis, QUEUE) == 15
        assert broker.held_by_queue(services.redis)[QUEUE] == 5
        assert passes(reconciler, 3) == 0
        assert messages(services) == len(jobs)


def test_messages_held_for_running_jobs_do_not_mask_a_lost_one(services):
    """With late acknowledgement a worker holds a running job's message until the job ends: it stands for
    no waiting job, so a busy queue must not count it against a waiting job's lost message."""
    reconciler = reconciler_for(services)
    jobs = backlog(services, 10)
    with services.celery.connection_for_read() as conn:
        channel = conn.default_channel
        held = [channel.basic_get(QUEUE, no_ack=False) for _ in range(5)]  # as workers running them hold them
        assert all(held)
        running = [broker._job_of(json.loads(services.redis.hget(broker.UNACKED_KEY, tag))[0])[0]
                   for tag in services.redis.hkeys(broker.UNACKED_KEY)]
        with services.engine.begin() as db:  # what their claims did
            db.execute(text("UPDATE jobs SET state = 'running', attempt = attempt + 1, node = 'busy', "
                            "started_at = now(), lease_expires_at = now() + interval '60 seconds' "
                            "WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": running})
        key = next(k for k in broker.priority_keys(QUEUE) if services.redis.llen(k))
        raw = services.redis.lindex(key, 0)
        assert services.redis.lrem(key, 1, raw) == 1  # one waiting job's message lost
        lost = broker._job_of(json.loads(raw))[0]
        assert lost not in running
        assert passes(reconciler, 2) == 1
        waiting = set(jobs) - set(running)
        assert {job for job, _ in broker.job_messages(services.redis, QUEUE)} >= waiting


def test_messages_held_by_a_killed_worker_are_republished(services):
    """A SIGKILLed worker's prefetch stays in the `unacked` hash until the visibility timeout (hours);
    a live worker starts what it holds at once, so a message held past the freshness bound is lost."""
    reconciler = reconciler_for(services)
    jobs = backlog(services, 10)
    with services.celery.connection_for_read() as conn:
        channel = conn.default_channel
        held = [channel.basic_get(QUEUE, no_ack=False) for _ in range(3)]  # then the worker is killed
        assert all(held)
        delivered_long_ago = time.time() - broker.HELD_FRESH_SECONDS - 5
        for tag in services.redis.hkeys(broker.UNACKED_KEY):
            services.redis.zadd(broker.UNACKED_INDEX_KEY, {tag: delivered_long_ago})
        assert broker.held_by_queue(services.redis)[QUEUE] == 0
        assert passes(reconciler, 3) == 3
        assert broker.queue_depth(services.redis, QUEUE) == len(jobs)


def test_a_crashed_publisher_is_recovered(services):
    """The row was committed, its message never published."""
    reconciler = reconciler_for(services)
    spec = lifecycle.JobSpec(type="noop", queue=QUEUE)
    with services.engine.begin() as conn:
        lifecycle.insert_jobs(conn, [spec])
    age(services, [str(spec.id)], 5.0)
    assert passes(reconciler, 2) == 1
    assert broker.job_messages(services.redis, QUEUE) == {(str(spec.id), 1)}


def test_a_flushed_broker_gets_every_waiting_job_republished(services):
    reconciler = reconciler_for(services, requeue_after=None)
    queued = backlog(services, 30)
    retried = backlog(services, 1)[0]  # failed once, its retry published and waiting
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, retried, 1, "n1", 60) is not None
        lifecycle.fail(conn, retried, 1, "n1", "boom", retry=True, backoff=0)
    assert reconciler.run_once()["retries_published"] == 1
    age(services, [retried], 5.0)
    services.redis.flushall()
    newcomer = backlog(services, 1, age_seconds=0)[0]  # submissions go on: the queue is not empty
    counts = reconciler.run_once()
    expected = {(job, 1) for job in queued + [newcomer]} | {(retried, 2)}
    assert broker.job_messages(services.redis, QUEUE) == expected
    # The session's reconciler process (when an earlier test started it) watches the same broker and
    # may notice the loss first: then it republishes and this one adopts its epoch. Either way every
    # waiting job has its message, once.
    assert counts["queued_republished"] <= len(queued) + 1
    passes(reconciler, 3)
    assert messages(services) == len(expected)
