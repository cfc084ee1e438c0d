"""The broker, the database, the API and the reconciler fail while a stream of jobs runs.

After each: every job final with its planned outcome, none completed twice, none
lost, the event log consistent, and every worker consuming again (Celery 5
workers have stopped consuming after a Redis reconnect: celery#8030, #7705).
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from nexus.jobs.reconciler import queue_depth
from nexus.queueing import broker
from tests.chaos.audit import audit, wait_all_final
from tests.chaos.cluster import TIER
from tests.chaos.faults import (busiest_worker, claims_after, fault_points, new_tenant, seconds_until_final, summary,
                                wait_running_on, wait_submitted)
from tests.chaos.stream import JobStream, canary_latency, plan_jobs
from tests.support import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def run_with_faults(cluster, profile, report, fault: str, inject, seed: int, measures: dict | None = None) -> dict:
    """A stream with `inject(tenant)` at each fault point (it returns once the failed part is back).

    Recovery: `outage_s` is how long the injection took (the part was down), `first_new_job_s` how long
    after it a newly submitted job took to succeed. `measures` holds lists the injection fills."""
    tenant = new_tenant(re.sub(r"[^A-Za-z0-9]+", "-", fault))
    stream = JobStream(cluster.url, tenant, plan_jobs(profile.jobs, seed=seed), per_second=profile.per_second).start()
    outages, recoveries, restarted_at = [], [], None
    for point in fault_points(profile.jobs, profile.repeats):
        wait_submitted(stream, point)
        began = time.monotonic()
        inject(tenant)
        outages.append(round(time.monotonic() - began, 2))
        restarted_at = time.time()
        recoveries.append(canary_latency(cluster.url, tenant + "-canary"))
    stream.join()
    settle = wait_all_final(cluster, tenant, profile.jobs)
    recovery = {"outage_s": summary(outages), "first_new_job_s": summary(recoveries)}
    recovery.update({name: summary(values) for name, values in (measures or {}).items()})
    result = report(audit(cluster, stream, fault, settle, recovery))
    return {"tenant": tenant, "result": result, "last_restart": restarted_at}


def assert_every_worker_consumes_after(cluster, tenant: str, since: float) -> None:
    """Each worker claimed jobs after the fault, and its own probe says it consumes (/healthz)."""
    claims = claims_after(cluster, tenant, since)
    idle = [name for name in cluster.worker_names if not claims.get(name)]
    # A worker Celery left not consuming (celery#8030) finds out through its own probe and shuts
    # down; a supervisor (agent, nexus dev, compose) starts a fresh one. The test plays supervisor.
    timeout = cluster.settings.worker_probe_timeout_seconds + 3 * cluster.settings.worker_probe_interval_seconds + 30
    for name in idle:
        wait_for(lambda: cluster.workers[name].process.poll() is not None, timeout=timeout, interval=0.5,
                 what=f"{name}, idle after the fault, shutting itself down for a restart")
        print(f"\n{name} stopped consuming after the fault and restarted itself (claims {claims})")
        cluster.start_worker(name)
    wait_for(lambda: (w := cluster.healthz()["workers"])["consuming"] >= len(cluster.worker_names)
             and not w["not_consuming"], timeout=30, interval=0.5, what="/healthz: every worker consuming")


def test_broker_restart(cluster, profile, report):
    run = run_with_faults(cluster, profile, report, "redis restart", lambda _: cluster.restart_redis(), seed=3)
    assert_every_worker_consumes_after(cluster, run["tenant"], run["last_restart"])


def test_broker_replaced_by_an_empty_one(cluster, profile, report):
    """Every queued message is gone: the reconciler re-publishes what PostgreSQL says is still queued.

    The workers are paused for a moment first, so messages are surely waiting when Redis loses them."""
    lost_messages: list[float] = []
    log_start = len(cluster.reconciler.log_text())  # count only this test's re-publications
    waiting = min(20, cluster.services.settings.max_broker_messages_per_tenant or 20)

    def inject(_tenant):
        for name in cluster.worker_names:
            cluster.kill_worker(name, signal.SIGSTOP)
        try:
            # Waiting in the queue's list or fetched by the paused workers (the tenant's share counts both,
            # nexus.jobs.fairshare); only the list's messages are lost: the workers keep theirs in memory.
            wait_for(lambda: queue_depth(cluster.services.redis, TIER) +
                     broker.held_by_queue(cluster.services.redis)[TIER] >= waiting, timeout=10, interval=0.05,
                     what="messages waiting in the broker")
            lost_messages.append(queue_depth(cluster.services.redis, TIER))  # what the flush loses
            cluster.restart_redis(empty=True)
        finally:
            for name in cluster.worker_names:
                cluster.kill_worker(name, signal.SIGCONT)

    run = run_with_faults(cluster, profile, report, "redis data loss", inject, seed=4,
                          measures={"messages_lost": lost_messages})
    assert_every_worker_consumes_after(cluster, run["tenant"], run["last_restart"])
    republished = sum(int(n) for n in re.findall(r"'queued_republished': (\d+)",
                                                      cluster.reconciler.log_text()[log_start:]))
    # (Lost messages of published `retrying` jobs are counted here too: they wait like queued ones.)
    # When every message was in the paused workers' memory, the flush lost none and nothing needs re-publishing.
    assert republished > 0 or not any(lost_messages), "the reconciler did not re-publish the lost queued jobs"


def test_database_restart(cluster, profile, report):
    """Pooled connections go stale (no pre-ping): the first statement on each fails once and is retried."""
    run = run_with_faults(cluster, profile, report, "postgres restart", lambda _: cluster.restart_postgres(), seed=5)
    assert_every_worker_consumes_after(cluster, run["tenant"], run["last_restart"])


def test_api_and_reconciler_killed(cluster, profile, report):
    """While both are down a worker dies too: its jobs wait for the reconciler to come back."""
    orphans_done: list[float] = []

    def inject(tenant):
        # Whichever worker runs jobs now: with the API down no job is submitted, and a worker chosen in
        # advance could have finished its last one by then (the test then had nothing to check).
        victim = busiest_worker(cluster, tenant)
        cluster.api.kill()
        cluster.reconciler.kill()
        orphans = wait_running_on(cluster, victim, tenant, timeout=5)
        cluster.kill_worker(victim)
        cluster.start_worker(victim, wait=False)
        time.sleep(cluster.settings.job_lease_seconds + 1)  # the leases run out with nobody to expire them
        restarted = time.time()
        cluster.start_reconciler()
        cluster.start_api()
        orphans_done.append(seconds_until_final(cluster, orphans, restarted))

    run_with_faults(cluster, profile, report, "api+reconciler kill", inject, seed=6,
                    measures={"orphans_final_after_restart_s": orphans_done})
    assert all(r is not None for r in orphans_done), "the killed worker held none of the stream's jobs"
