"""Stale/offline transitions, leases that outlive a silent node's heartbeats, quarantine and the decline of retries,
with the real reconciler pass over real PostgreSQL and Redis."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from nexus.jobs.placement import decline_retry
from nexus.nodes.states import NodeState, liveness_state, state_on_heartbeat
from nexus.jobs import lifecycle
from nexus.jobs.failures import FailureKind
from nexus.jobs.reconciler import Reconciler, queue_depth
from tests.agent_support import beat, registered
from tests.conftest import auth
from tests.support import start_worker, wait_for

pytestmark = pytest.mark.timeout(120)


def reconciler_for(services, **overrides) -> Reconciler:
    settings = services.settings.model_copy(update=overrides)
    return Reconciler(settings, services.engine, services.celery, services.redis)


def state_of(services, node_id: str) -> str:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM nodes WHERE id = :id"), {"id": node_id}).scalar()


def job(services, job_id: str) -> dict:
    with services.engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one())


def submit(services, tier: str = "gpu_peer", **fields) -> str:
    """A job on a queue no test worker consumes, so only this test's claims touch it."""
    [(row, _)] = services.submitter.submit_many([{"type": "noop", "requirements": {"tier": tier}, **fields}],
                                                tenant="default")
    return str(row.id)


def claim(services, job_id: str, attempt: int, node: str) -> None:
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, job_id, attempt, node, 60) is not None


def test_silent_nodes_go_stale_then_offline_and_come_back(api, services):
    node = registered(api, "quiet")
    beat(api, node)
    reconciler = reconciler_for(services, node_stale_after_seconds=1.0, node_offline_after_seconds=2.5)
    assert reconciler.run_once()["nodes_stale"] == 0
    time.sleep(1.2)
    assert reconciler.run_once()["nodes_stale"] == 1 and state_of(services, node["node_id"]) == "stale"
    time.sleep(1.5)
    assert reconciler.run_once()["nodes_offline"] == 1 and state_of(services, node["node_id"]) == "offline"
    assert beat(api, node).json["state"] == "ready"  # a node that comes back is ready again


def runner_for(services, node: str, settings=None):
    from nexus.jobs.notify import Notifier
    from nexus.jobs.runtime import JobRunner

    return JobRunner(settings or services.settings, services.engine, services.store, services.submitter,
                     Notifier(services.redis), node)


def events_of(services, job_id: str) -> list[str]:
    with services.engine.connect() as conn:
        return list(conn.execute(text("SELECT message FROM job_events WHERE job_id = :id ORDER BY id"),
                                 {"id": job_id}).scalars())


def test_a_node_cut_off_from_the_api_keeps_a_job_whose_worker_renews_its_lease(api, services):
    """Heartbeats stop (the API is stalled or down), the worker goes on renewing in PostgreSQL:
    the node goes offline, yet its job is not forfeited and finishes in its first attempt."""
    import threading

    node = registered(api, "cut-off", "rtx4090")
    beat(api, node, "rtx4090")  # its last beat: from now on the node is silent
    job_id = submit(services, type="sleep", payload={"seconds": 4.0})
    # The test settings lease for 3 s, renewed every 0.5 s by the runner's LeaseRenewer.
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(runner_for(services, "cut-off").execute(job_id, 1)))
    worker.start()
    reconciler = reconciler_for(services, node_stale_after_seconds=0.3, node_offline_after_seconds=0.6)
    went_offline = False
    while worker.is_alive():
        went_offline |= reconciler.run_once()["nodes_offline"] == 1
        time.sleep(0.2)
    worker.join()
    assert went_offline and state_of(services, node["node_id"]) == "offline"
    finished = job(services, job_id)
    assert outcome == ["succeeded"] and finished["state"] == "succeeded" and finished["attempt"] == 1
    assert finished["failed_nodes"] == [] and "lease expired" not in events_of(services, job_id)


def test_an_offline_nodes_job_whose_worker_died_is_requeued_when_its_lease_expires(api, services):
    node = registered(api, "vanishing", "rtx4090")
    beat(api, node, "rtx4090")
    job_id = submit(services)
    with services.engine.begin() as conn:  # claimed by a worker that dies at once: nobody renews the lease
        # A lease long enough that a slow (loaded) first pass still runs before it expires.
        assert lifecycle.claim(conn, job_id, 1, "vanishing", 4.0) is not None
    reconciler = reconciler_for(services, node_stale_after_seconds=0.3, node_offline_after_seconds=0.6)
    time.sleep(0.8)
    counts = reconciler.run_once()
    assert counts["nodes_offline"] == 1 and counts["leases_expired"] == 0  # offline alone ends no lease
    assert job(services, job_id)["state"] == "running"
    time.sleep(3.3)
    counts = reconciler.run_once()
    assert counts["leases_expired"] == 1 and counts["retries_published"] == 1
    requeued = job(services, job_id)
    assert requeued["state"] == "retrying" and requeued["failed_nodes"] == ["vanishing"]
    assert "vanishing" in requeued["error"] and "lease expired" in events_of(services, job_id)
    assert queue_depth(services.redis, "gpu_peer") >= 1  # a message for attempt 2 is waiting


def test_a_node_failing_k_jobs_in_a_row_is_quarantined_until_resumed(api, services):
    threshold = services.settings.node_quarantine_after_failures
    node = registered(api, "flaky", "rtx4090")
    beat(api, node, "rtx4090")
    reconciler = reconciler_for(services)

    def fail_one(succeed: bool = False):
        job_id = submit(services, max_attempts=1)
        claim(services, job_id, 1, "flaky")
        with services.engine.begin() as conn:
            if succeed:
                lifecycle.complete(conn, job_id, 1, "flaky", {"ok": True}, None)
            else:
                lifecycle.fail(conn, job_id, 1, "flaky", "CUDA error: boom", retry=False, backoff=0,
                               kind=FailureKind.INFRASTRUCTURE)

    for _ in range(threshold - 1):
        fail_one()
    fail_one(succeed=True)  # a success ends the streak
    for _ in range(threshold - 1):
        fail_one()
    assert reconciler.run_once()["nodes_quarantined"] == 0 and state_of(services, node["node_id"]) == "ready"
    fail_one()
    assert reconciler.run_once()["nodes_quarantined"] == 1
    assert state_of(services, node["node_id"]) == "quarantined"
    assert beat(api, node, "rtx4090").json["state"] == "quarantined"  # heartbeats do not clear it
    listed = api.get("/api/v1/nodes?state=quarantined", headers=auth()).json["nodes"]
    assert [n["consecutive_failures"] for n in listed] == [threshold]
    resumed = api.post(f"/api/v1/nodes/{node['node_id']}/resume", headers=auth()).json
    assert resumed["state"] == "ready" and resumed["consecutive_failures"] == 0


def runner_on(services, node: str):
    from nexus.jobs.notify import Notifier
    from nexus.jobs.runtime import JobRunner

    return JobRunner(services.settings, services.engine, services.store, services.submitter,
                     Notifier(services.redis), node)


def node_row(services, node_id: str) -> dict:
    with services.engine.connect() as conn:
        return dict(conn.execute(text("SELECT state, consecutive_failures FROM nodes WHERE id = :id"),
                                 {"id": node_id}).mappings().one())


def failure_kinds(services, job_ids: list[str]) -> list[str]:
    with services.engine.connect() as conn:
        return [r[0] for r in conn.execute(text(
            "SELECT failure_kind FROM job_events WHERE job_id = ANY(CAST(:ids AS uuid[])) "
            "AND from_state = 'running' AND to_state IN ('retrying', 'failed') ORDER BY id"), {"ids": job_ids})]


def test_a_flood_of_one_tenants_failing_jobs_does_not_quarantine_the_node(api, services):
    """30 `noop` jobs with `fail_attempts` through the real JobRunner: their handlers raise, the jobs fail,
    the node that ran them is not at fault (this quarantined a node within 20 s)."""
    node = registered(api, "shared", "rtx4090")
    beat(api, node, "rtx4090")
    runner = runner_on(services, "shared")
    job_ids = [submit(services, payload={"fail_attempts": 100}, max_attempts=1) for _ in range(30)]
    assert [runner.execute(job_id, 1) for job_id in job_ids] == ["failed"] * 30
    assert reconciler_for(services).run_once()["nodes_quarantined"] == 0
    assert node_row(services, node["node_id"]) == {"state": "ready", "consecutive_failures": 0}
    assert failure_kinds(services, job_ids) == ["job"] * 30


def test_a_node_whose_workers_keep_dying_is_still_quarantined(api, services):
    """Leases nobody renews (the worker was killed or lost mid-job) are the node failing; jobs failing
    on their own in between neither count nor end that streak."""
    threshold = services.settings.node_quarantine_after_failures
    node = registered(api, "dying", "rtx4090")
    beat(api, node, "rtx4090")
    reconciler = reconciler_for(services)

    def lose(count: int) -> list[str]:
        job_ids = [submit(services, max_attempts=1) for _ in range(count)]
        for job_id in job_ids:
            with services.engine.begin() as conn:
                assert lifecycle.claim(conn, job_id, 1, "dying", 0.01) is not None  # then nobody renews it
        time.sleep(0.05)
        reconciler.run_once()  # (or the session's reconciler process, if an earlier test started it)
        wait_for(lambda: all(job(services, job_id)["state"] == "failed" for job_id in job_ids), timeout=10,
                 what="the unrenewed leases expired")
        return job_ids

    lost = lose(threshold - 1)
    own = [submit(services, payload={"fail_attempts": 100}, max_attempts=1) for _ in range(3)]
    assert [runner_on(services, "dying").execute(job_id, 1) for job_id in own] == ["failed"] * 3
    assert node_row(services, node["node_id"]) == {"state": "ready", "consecutive_failures": threshold - 1}
    lost += lose(1)
    assert failure_kinds(services, lost) == ["infrastructure"] * threshold
    reconciler.run_once()
    assert wait_for(lambda: node_row(services, node["node_id"])["state"] == "quarantined", timeout=10,
                    what="quarantine")
    assert node_row(services, node["node_id"]) == {"state": "quarantined", "consecutive_failures": threshold}


def test_a_retry_declines_the_node_where_it_failed_while_another_can_take_it(api, services):
    settings = services.settings
    first, other = registered(api, "first", "rtx4090"), registered(api, "other", "rtx4090")
    beat(api, first, "rtx4090")
    job_id = submit(services)
    claim(services, job_id, 1, "first")
    with services.engine.begin() as conn:
        lifecycle.fail(conn, job_id, 1, "first", "boom", retry=True, backoff=0)
    services.redis.flushdb()
    # `other` has not heartbeated yet (registering): no eligible node, so `first` runs it again.
    assert not decline_retry(services.engine, services.celery, settings, job_id, 2, "first")
    beat(api, other, "rtx4090")
    assert decline_retry(services.engine, services.celery, settings, job_id, 2, "first")
    assert queue_depth(services.redis, "gpu_peer") == 1  # published again for someone else
    assert not decline_retry(services.engine, services.celery, settings, job_id, 2, "other")
    # After the window, better a repeat on the same node than no run at all.
    late = settings.model_copy(update={"node_avoid_failed_seconds": 0.0})
    assert not decline_retry(services.engine, services.celery, late, job_id, 2, "first")
    # A drained `other` is not eligible either.
    api.post(f"/api/v1/nodes/{other['node_id']}/drain", headers=auth())
    assert not decline_retry(services.engine, services.celery, settings, job_id, 2, "first")


@pytest.mark.parametrize("current", [s for s in NodeState if s is not NodeState.REMOVED])
@pytest.mark.parametrize("drain_requested,agent_draining", [(False, False), (True, False), (False, True)])
def test_heartbeat_sql_follows_the_state_rules(api, services, current, drain_requested, agent_draining):
    node = registered(api, "rules")
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE nodes SET state = :s, drain_requested = :d WHERE id = :id"),
                     {"s": current.value, "d": drain_requested, "id": node["node_id"]})
    answer = beat(api, node, state="draining" if agent_draining else "ready").json
    assert answer["state"] == state_on_heartbeat(current, drain_requested, agent_draining).value


@pytest.mark.parametrize("current", list(NodeState))
@pytest.mark.parametrize("silent_for", [0.0, 30.0, 90.0])
def test_liveness_sql_follows_the_state_rules(api, services, current, silent_for):
    node = registered(api, "aging")
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE nodes SET state = :s, last_heartbeat_at = now() - make_interval(secs => :age) "
                          "WHERE id = :id"), {"s": current.value, "age": silent_for, "id": node["node_id"]})
    reconciler_for(services, node_stale_after_seconds=20.0, node_offline_after_seconds=60.0).run_once()
    expected = liveness_state(current, silent_for, 20.0, 60.0) or current
    assert state_of(services, node["node_id"]) == expected.value


def test_the_worker_runtime_declines_then_runs_where_it_may(api, services):
    """The real JobRunner: node `first` declines the retry it failed, node `other` runs it."""
    from nexus.jobs.notify import Notifier
    from nexus.jobs.runtime import JobRunner

    def runner(node: str) -> JobRunner:
        return JobRunner(services.settings, services.engine, services.store, services.submitter,
                         Notifier(services.redis), node)

    for name in ("first", "other"):
        beat(api, registered(api, name, "rtx4090"), "rtx4090")
    retry_id = submit(services, payload={"fail_attempts": 1})
    assert runner("first").execute(retry_id, 1) == "retrying"
    assert job(services, retry_id)["failed_nodes"] == ["first"]
    assert runner("first").execute(retry_id, 2) == "declined"
    assert job(services, retry_id)["state"] == "retrying"  # untouched by the declining node
    time.sleep(services.settings.retry_backoff_max_seconds)  # the retry's backoff
    assert runner("other").execute(retry_id, 2) == "succeeded"
    assert job(services, retry_id)["node"] == "other"


def test_a_declined_retry_reaches_the_idle_node_beside_the_one_that_declines_it(api, services, reconciler,
                                                                                 live_api, tmp_path):
    """Real workers on one queue: `a` failed the job and declines each return of its retry; `b`, idle, must get it.

    Redis hands a pushed message to the consumer that has waited longest. The declining worker's consumer
    blocked again when it received the delayed message, so it had waited exactly the delay when the
    declined message came back. With the delay equal to kombu's BRPOP timeout (1 s), it was the longest
    waiter every time: in a chaos run one retry went back to its failed node 102 times in a row for 100 s
    while two other nodes sat idle."""
    nodes = [registered(api, name, "rtx4070") for name in ("decline-a", "decline-b")]

    def both_ready() -> None:  # not stale (20 s without a beat) while the test runs
        for node in nodes:
            beat(api, node, "rtx4070")

    both_ready()
    queue_args = ["--queues", "gpu_infra", "-c", "2", "-P", "threads"]
    workers = [start_worker(services.settings, tmp_path, "decline-a", queue_args)]
    try:
        job_id = submit(services, tier="gpu_infra", payload={"fail_attempts": 1}, max_attempts=3)
        wait_for(lambda: f"job {job_id} attempt 2: declined" in workers[0].log_text(), timeout=30,
                 what="decline-a declining the retry it failed")
        both_ready()
        workers.append(start_worker(services.settings, tmp_path, "decline-b", queue_args))
        both_ready()
        wait_for(lambda: job(services, job_id)["state"] == "succeeded", timeout=20, interval=0.2,
                 what="the retry run by the idle node")
        declines = workers[0].log_text().count(f"job {job_id} attempt 2: declined")
        assert job(services, job_id)["node"] == "decline-b", f"decline-a declined it {declines} times, then ran it"
    finally:
        for worker in workers:
            worker.stop(10)
