"""A worker proves it consumes; one that is alive but stopped consuming is reported and restarted.

"Stopped consuming" is produced for real: Celery's own remote control cancels
the worker's consumers (the state celery#8030 leaves a worker in after a Redis
reconnect), while the process and its threads stay alive.
"""

from __future__ import annotations

import sys
import time

import pytest

from nexus.supervisor import ChildSpec, RestartPolicy, Supervisor
from nexus.queueing.health import CONSUMING, NOT_CONSUMING, StuckWorkers, probe_queue, worker_records
from tests.support import wait_for

pytestmark = pytest.mark.timeout(180)

FAST_PROBES = {"NEXUS_WORKER_PROBE_INTERVAL_SECONDS": "0.5", "NEXUS_WORKER_PROBE_TIMEOUT_SECONDS": "2"}
QUEUE = "gpu_peer"  # a queue the session's shared worker does not consume


def record_of(services, pid: int) -> dict | None:
    return next((r for r in worker_records(services.redis) if r["pid"] == pid), None)


def stop_consuming(services, hostname: str) -> None:
    for queue in (QUEUE, probe_queue(hostname)):
        services.celery.control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=5)


def test_stuck_worker_is_reported_and_restarted_by_the_supervisor(services, api, session_dir):
    env = {**services.settings.worker_environment(), **FAST_PROBES, "NEXUS_NODE_NAME": "probe-worker"}
    spec = ChildSpec("probe-worker", (sys.executable, "-m", "nexus", "worker", "--name", "probe-worker",
                                      "-Q", QUEUE), env)
    supervisor = Supervisor([spec], RestartPolicy(0.2, 1.0, 60.0), unhealthy=StuckWorkers(services.redis, every=0.3))

    def poll_until(predicate, what, timeout=60):
        return wait_for(lambda: (supervisor.poll(), predicate())[1], timeout=timeout, interval=0.2, what=what)

    supervisor.start()
    try:
        first_pid = supervisor.status()[0]["pid"]
        first = poll_until(lambda: (r := record_of(services, first_pid)) and r["state"] == CONSUMING and r,
                           "the worker proves it consumes")
        assert api.get("/healthz").json["workers"]["consuming"] >= 1

        stop_consuming(services, first["name"])
        poll_until(lambda: supervisor.status()[0]["pid"] not in (None, first_pid), "the stuck worker replaced",
                   timeout=90)
        assert any(e.kind == "exited" for e in supervisor.events)
        second_pid = supervisor.status()[0]["pid"]
        poll_until(lambda: (r := record_of(services, second_pid)) and r["state"] == CONSUMING,
                   "the restarted worker consumes")
        job = services.submitter.submit_many([{"type": "noop", "requirements": {"tier": QUEUE}}], "default")[0][0]
        poll_until(lambda: _state(services, job.id) == "succeeded", "a job on the restarted worker")
    finally:
        supervisor.stop(grace_seconds=10)


def test_healthz_names_a_worker_that_does_not_consume(services, app, session_dir):
    from tests.support import start_worker

    # Reporting alone: this worker must stay up (not shut itself down) so /healthz can name it.
    worker = start_worker(services.settings, session_dir, name="quiet-worker", extra_args=["-Q", QUEUE],
                          extra_env={**FAST_PROBES, "NEXUS_WORKER_EXIT_WHEN_NOT_CONSUMING": "false"})
    try:
        pid = worker.process.pid
        record = wait_for(lambda: (r := record_of(services, pid)) and r["state"] == CONSUMING and r, timeout=30,
                          what="consuming")
        stop_consuming(services, record["name"])
        wait_for(lambda: record_of(services, pid)["state"] == NOT_CONSUMING, timeout=30, what="not consuming")
        time.sleep(3.1)  # /healthz caches the worker summary for 3 s
        health = app.test_client().get("/healthz")
        assert health.status_code == 200  # a stuck worker is not an outage of the master
        assert health.json["workers"]["ok"] is False
        assert record["name"] in health.json["workers"]["not_consuming"]
        assert StuckWorkers(services.redis, every=0)(pid) is True
        assert "alive but does not consume" in worker.log_text()
    finally:
        worker.stop()


def _state(services, job_id) -> str:
    from nexus.jobs.queries import get_job

    return get_job(services.engine, job_id).state
