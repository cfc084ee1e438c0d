"""Claims, fencing, the reconciler, cancellation and a worker killed mid-job, with real processes."""

from __future__ import annotations

import signal
import threading
import uuid

import pytest
from sqlalchemy import text

from nexus.db.prepared import Prepared
from nexus.jobs import lifecycle
from nexus.jobs.reconciler import Reconciler, queue_depth
from tests.conftest import auth
from tests.support import start_worker, wait_for

pytestmark = pytest.mark.timeout(180)


def job_row(services, job_id) -> dict:
    with services.engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one())


def events(services, job_id) -> list[tuple]:
    with services.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT from_state, to_state, attempt, node FROM job_events WHERE job_id = :id ORDER BY id"),
            {"id": job_id})]


def submit(services, raw: dict) -> uuid.UUID:
    [(row, _)] = services.submitter.submit_many([raw], tenant="default")
    return row.id


def reconciler_for(services) -> Reconciler:
    return Reconciler(services.settings, services.engine, services.celery, services.redis)


def test_only_one_of_competing_claims_wins(services):
    job_id = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    barrier, winners = threading.Barrier(8), []

    def claim(node):
        barrier.wait()
        with services.engine.begin() as conn:
            if lifecycle.claim(conn, job_id, 1, node, 30):
                winners.append(node)

    threads = [threading.Thread(target=claim, args=(f"node-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert job_row(services, job_id)["node"] == winners[0]
    with services.engine.begin() as conn:  # a duplicate message for the same attempt is dropped
        assert lifecycle.claim(conn, job_id, 1, "late", 30) is None


def test_a_fenced_off_attempt_cannot_overwrite_the_newer_one(services):
    job_id = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, job_id, 1, "zombie", 30)
        conn.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                     {"id": job_id})
    assert reconciler_for(services).run_once()["leases_expired"] == 1
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET not_before = now() WHERE id = :id"), {"id": job_id})
        assert lifecycle.claim(conn, job_id, 2, "fresh", 30)
        assert lifecycle.complete(conn, job_id, 1, "zombie", {"from": "zombie"}, None) is None
        assert lifecycle.fail(conn, job_id, 1, "zombie", "late failure", True, 0) is None
        assert lifecycle.complete(conn, job_id, 2, "fresh", {"from": "fresh"}, None)
    row = job_row(services, job_id)
    assert (row["state"], row["attempt"], row["result"]) == ("succeeded", 2, {"from": "fresh"})
    assert [e[1] for e in events(services, job_id)].count("succeeded") == 1


def test_claims_respect_max_attempts(services):
    job_id = submit(services, {"type": "noop", "max_attempts": 1, "requirements": {"tier": "gpu_peer"}})
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, job_id, 1, "a", 30)
        assert lifecycle.fail(conn, job_id, 1, "a", "boom", True, 0).state == "failed"
        assert lifecycle.claim(conn, job_id, 2, "a", 30) is None


def test_a_claim_reads_one_row_however_long_the_backlog(services):
    """With stale statistics the planner once scanned every queued job by state for each claim:
    O(backlog) per claim, exactly when the queue is long. Each plan node must see at most one row,
    but for the count of the tenant's published messages (the refill check), which is its share."""
    services.submitter.submit_many([{"type": "noop", "requirements": {"tier": "gpu_peer"}}] * 500, tenant="default")
    job_id = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    # The statement the claim function runs, prepared as it is inside the function (one plan per session).
    body = Prepared("test_claim_body", lifecycle.CLAIM.body, lifecycle.CLAIM.params)
    claim_sql = body._execute
    with services.engine.begin() as conn:
        body.execute(conn, {"id": uuid.uuid4(), "attempt": 1, "node": "warm", "lease": 30.0, "event_node": None,
                            "event_message": None, "event_failure_kind": None,
                            "share": services.settings.max_broker_messages_per_tenant})  # prepares it here
        [plan] = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {claim_sql}", {
            "id": job_id, "attempt": 1, "node": "a", "lease": 30.0, "event_node": "a", "event_message": None,
            "event_failure_kind": None, "share": services.settings.max_broker_messages_per_tenant,
        }).scalar_one()

    def rows_seen(node: dict):
        yield node["Actual Rows"] * node["Actual Loops"]
        for child in node.get("Plans", []):
            yield from rows_seen(child)

    assert max(rows_seen(plan["Plan"])) <= max(1, services.settings.max_broker_messages_per_tenant), plan
    assert job_row(services, job_id)["state"] == "running"


def test_reconciler_republishes_jobs_whose_messages_were_lost(services):
    job_id = submit(services, {"type": "noop", "requirements": {"tier": "gpu_infra"}})
    assert queue_depth(services.redis, "gpu_infra") == 1
    services.redis.flushdb()  # the broker lost everything
    with services.engine.begin() as conn:  # as if submitted a while ago
        conn.execute(text("UPDATE jobs SET published_at = now() - interval '10 seconds' WHERE id = :id"),
                     {"id": job_id})
    counts = reconciler_for(services).run_once()
    assert counts["queued_republished"] == 1
    assert queue_depth(services.redis, "gpu_infra") == 1
    assert reconciler_for(services).run_once()["queued_republished"] == 0  # not while its message waits


def test_cancelling_a_running_job_stops_it_cooperatively(services, worker):
    job_id = submit(services, {"type": "sleep", "payload": {"seconds": 60}})
    wait_for(lambda: job_row(services, job_id)["state"] == "running", what="job running")
    with services.engine.begin() as conn:
        lifecycle.request_cancel(conn, job_id, by="test")
    row = wait_for(lambda: (r := job_row(services, job_id))["state"] == "cancelled" and r, timeout=15,
                   what="job cancelled")
    assert row["finished_at"] is not None


def test_sigkilled_worker_mid_job_still_ends_succeeded_once(services, reconciler, session_dir):
    victim = start_worker(services.settings, session_dir, name="victim", extra_args=["--tier", "gpu_infra"])
    try:
        job_id = submit(services, {"type": "sleep", "payload": {"seconds": 2}, "requirements": {"tier": "gpu_infra"}})
        wait_for(lambda: job_row(services, job_id)["state"] == "running", what="job running on the victim")
        victim.signal(signal.SIGKILL)
    finally:
        victim.kill()
    rescuer = start_worker(services.settings, session_dir, name="rescuer", extra_args=["--tier", "gpu_infra"])
    try:
        row = wait_for(lambda: (r := job_row(services, job_id))["state"] == "succeeded" and r, timeout=60,
                       what="job succeeded after the kill")
    finally:
        rescuer.stop()
    assert row["attempt"] == 2 and row["node"] == "rescuer"
    story = events(services, job_id)
    assert [e[1] for e in story].count("succeeded") == 1
    assert ("running", "retrying", 1, "victim") in story


def test_output_objects_come_back_as_presigned_urls(api, services):
    import requests

    key = services.store.put_bytes(services.settings.bucket_outputs, "jobs/x/output", b"result bytes")
    assert key
    job_id = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET output_key = 'jobs/x/output' WHERE id = :id"), {"id": job_id})
    view = api.get(f"/api/v1/jobs/{job_id}", headers=auth()).json
    assert requests.get(view["output_url"], timeout=10).content == b"result bytes"


def test_inputs_uploaded_through_the_api_are_tenant_scoped(api, services):
    alice = api.post("/api/v1/tokens", json={"name": "a", "role": "submitter", "tenant": "a"}, headers=auth()).json
    bob = api.post("/api/v1/tokens", json={"name": "b", "role": "submitter", "tenant": "b"}, headers=auth()).json
    upload = api.post("/api/v1/inputs?name=data.jsonl", data=b'{"x": 1}\n', headers=auth(alice["token"]))
    assert upload.status_code == 201 and upload.json["key"].startswith("a/")
    key = upload.json["key"]
    assert services.store.get_bytes(services.settings.bucket_inputs, key) == b'{"x": 1}\n'
    stolen = api.post("/api/v1/jobs", json={"type": "sleep", "input_key": key}, headers=auth(bob["token"]))
    assert stolen.status_code in (400, 403)
    assert api.post("/api/v1/inputs", data=b"", headers=auth(alice["token"])).status_code == 400


def test_a_large_batch_is_planned_for_its_size_not_with_the_plan_cached_for_single_submissions(services):
    """After five runs PostgreSQL may keep a generic plan for a prepared statement; the one it kept after
    single submissions took 52 s for a bulk of 10,000 that a plan of its own did in 3 s (bench/dispatch.py)."""
    from nexus.jobs.submit import build_spec

    def specs(n: int):
        return [build_spec({"type": "noop", "requirements": {"tier": "gpu_peer"}}, services.settings, "plans")
                for _ in range(n)]

    with services.engine.connect() as conn:
        for _ in range(6):
            lifecycle.insert_jobs(conn, specs(1), share=4)
        assert len(lifecycle.insert_jobs(conn, specs(lifecycle.LARGE_BATCH + 1), share=4)) == lifecycle.LARGE_BATCH + 1
        plans = {r.name: (r.generic_plans, r.custom_plans) for r in conn.execute(
            text("SELECT name, generic_plans, custom_plans FROM pg_prepared_statements"))}
        conn.commit()
    generic, custom = plans["nexus_insert_many_jobs"]
    assert (generic, custom) == (0, 1)
