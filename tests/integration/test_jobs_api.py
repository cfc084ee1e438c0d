"""The jobs API over real PostgreSQL, Redis, S3 and a real Celery worker."""

from __future__ import annotations

import re

import pytest

from sqlalchemy import text

from nexus.jobs.reconciler import queue_depth
from nexus.queueing.tiers import TIER_ORDER
from tests.conftest import auth
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)


def submit(api, body, headers=None, **kw):
    return api.post("/api/v1/jobs", json=body, headers=headers or auth(), **kw)


def wait_final(api, job_id, timeout=30):
    response = api.get(f"/api/v1/jobs/{job_id}?wait={timeout}", headers=auth())
    assert response.status_code == 200, response.json
    return response.json


def test_noop_job_runs_on_a_real_worker(api, worker):
    response = submit(api, {"type": "noop", "payload": {"echo": "hi"}})
    assert response.status_code == 201
    job = response.json
    assert job["state"] == "queued" and job["queue"] == "cpu_only"
    done = wait_final(api, job["id"])
    assert done["state"] == "succeeded"
    assert done["result"] == {"echo": "hi"}
    assert done["attempt"] == 1 and done["node"]  # any worker of the cpu_only queue
    events = api.get(f"/api/v1/jobs/{job['id']}/events", headers=auth()).json["events"]
    assert [(e["from_state"], e["to_state"]) for e in events] == [(None, "queued"), ("queued", "running"),
                                                                  ("running", "succeeded")]


def test_a_synchronous_submit_returns_the_finished_job(api, worker):
    response = api.post("/api/v1/jobs?wait=30", json={"type": "noop", "payload": {"echo": "now"}}, headers=auth())
    assert response.status_code == 201
    assert (response.json["state"], response.json["result"]) == ("succeeded", {"echo": "now"})
    # A job that outlasts the wait comes back as it stands, to be followed with GET ?wait=.
    slow = api.post("/api/v1/jobs?wait=0.2", json={"type": "sleep", "payload": {"seconds": 3}}, headers=auth())
    assert slow.status_code == 201 and slow.json["state"] in ("queued", "running")
    assert wait_final(api, slow.json["id"])["state"] == "succeeded"
    for bad in ("31", "-1", "soon"):
        response = api.post(f"/api/v1/jobs?wait={bad}", json={"type": "noop"}, headers=auth())
        assert response.status_code == 400 and "wait" in str(response.json["error"]), response.json


def test_failing_job_retries_then_succeeds(api, worker, reconciler):
    job = submit(api, {"type": "noop", "payload": {"fail_attempts": 2}, "max_attempts": 3}).json
    done = wait_final(api, job["id"])
    assert done["state"] == "succeeded" and done["attempt"] == 3
    states = [e["to_state"] for e in api.get(f"/api/v1/jobs/{job['id']}/events", headers=auth()).json["events"]]
    assert states.count("retrying") == 2


def test_failing_job_gives_up_after_max_attempts(api, worker, reconciler):
    job = submit(api, {"type": "noop", "payload": {"fail_attempts": 5}, "max_attempts": 2}).json
    done = wait_final(api, job["id"])
    assert done["state"] == "failed" and done["attempt"] == 2
    assert "injected failure on attempt 2" in done["error"]


def test_idempotency_key_returns_the_same_job(api):
    first = submit(api, {"type": "noop"}, headers={**auth(), "Idempotency-Key": "abc"})
    again = submit(api, {"type": "noop"}, headers={**auth(), "Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json["id"] == again.json["id"]
    by_field = submit(api, {"type": "noop", "idempotency_key": "abc"})
    assert by_field.json["id"] == first.json["id"]


def test_bulk_submit_in_one_transaction(api, services):
    body = {"jobs": [{"type": "noop", "payload": {"echo": i}} for i in range(500)]}
    response = api.post("/api/v1/jobs/bulk", json=body, headers=auth())
    assert response.status_code == 201
    assert response.json["created"] == 500
    bad = {"jobs": [{"type": "noop"}] * 10 + [{"type": "sleep", "payload": {"seconds": -1}}]}
    response = api.post("/api/v1/jobs/bulk", json=bad, headers=auth())
    assert response.status_code == 400
    assert response.json["error"]["details"]["index"] == 10
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 500  # nothing of the bad batch


@pytest.mark.parametrize("body, status, fragment", [
    ({"type": "noop", "priority": 10}, 400, "priority"),
    ({"type": "noop", "priority": "high"}, 400, "priority"),
    ({"type": "noop", "requirements": {"tier": "moon"}}, 400, "unknown tier"),
    ({"type": "noop", "unknown": 1}, 400, "unknown"),
    ({"type": "nope"}, 400, "unknown job type"),
    ({"type": "sleep", "payload": {"seconds": "long"}}, 400, "seconds"),
    ({"payload": {}}, 400, "type"),
    ([1, 2], 400, ""),
])
def test_bad_submissions_get_a_clear_400_and_leave_nothing(api, services, body, status, fragment):
    response = submit(api, body)
    assert response.status_code == status
    error = response.json["error"]
    assert set(error) == {"code", "message", "details"}
    assert fragment in str(error)
    assert all(queue_depth(services.redis, tier.queue) == 0 for tier in TIER_ORDER)  # no message
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0  # no row


def test_malformed_json_and_oversize_bodies(api, services):
    response = api.post("/api/v1/jobs", data="{bad", headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json["error"]["message"]
    big = {"type": "noop", "payload": {"echo": "x" * (services.settings.max_body_bytes + 10)}}
    response = submit(api, big)
    assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"


def test_tokens_roles_and_tenants(api):
    alice = api.post("/api/v1/tokens", json={"name": "alice", "role": "submitter", "tenant": "a"}, headers=auth()).json
    bob = api.post("/api/v1/tokens", json={"name": "bob", "role": "submitter", "tenant": "b"}, headers=auth()).json
    job = submit(api, {"type": "noop"}, headers=auth(alice["token"])).json
    assert job["tenant"] == "a"
    assert api.get(f"/api/v1/jobs/{job['id']}", headers=auth(bob["token"])).status_code == 404
    assert api.get(f"/api/v1/jobs/{job['id']}", headers=auth(alice["token"])).status_code == 200
    assert [j["id"] for j in api.get("/api/v1/jobs", headers=auth(bob["token"])).json["jobs"]] == []
    assert api.get("/api/v1/tokens", headers=auth(alice["token"])).status_code == 403
    assert submit(api, {"type": "noop", "tenant": "b"}, headers=auth(alice["token"])).status_code == 403
    assert api.delete(f"/api/v1/tokens/{alice['id']}", headers=auth()).status_code == 200
    assert api.get(f"/api/v1/jobs/{job['id']}", headers=auth(alice["token"])).status_code == 401
    assert api.get("/api/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert api.get("/api/v1/jobs").status_code == 401
    assert api.get("/healthz").status_code == 200


def test_cancel_a_queued_job_and_retry_it(api, services):
    job = submit(api, {"type": "sleep", "requirements": {"tier": "gpu_peer"}}).json  # no gpu_peer worker: stays queued
    cancelled = api.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth()).json
    assert cancelled["state"] == "cancelled"
    retried = api.post(f"/api/v1/jobs/{job['id']}/retry", headers=auth())
    assert retried.status_code == 200 and retried.json["state"] == "retrying"
    again = api.post(f"/api/v1/jobs/{job['id']}/retry", headers=auth())
    assert again.status_code == 409


def test_list_jobs_paginates_with_a_cursor(api):
    api.post("/api/v1/jobs/bulk", json={"jobs": [{"type": "noop"} for _ in range(25)]}, headers=auth())
    seen, cursor = [], None
    while True:
        page = api.get("/api/v1/jobs", query_string={"limit": 10, **({"cursor": cursor} if cursor else {})},
                       headers=auth()).json
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 25
    assert api.get("/api/v1/jobs?state=bogus", headers=auth()).status_code == 400
    assert api.get("/api/v1/jobs?cursor=zzz", headers=auth()).status_code == 400


def test_healthz_and_metrics(api):
    health = api.get("/healthz").json
    assert health["status"] == "ok"
    assert set(health["dependencies"]) == {"database", "broker", "storage"}
    submit(api, {"type": "noop"})
    metrics = api.get("/metrics", headers=auth())
    assert metrics.status_code == 200
    counted = re.findall(r'nexus_jobs\{state="(\w+)",type="noop"\} 1.0', metrics.text)
    assert len(counted) == 1 and counted[0] in ("queued", "running", "succeeded")  # a worker may have it
    assert 'nexus_queue_depth{queue="cpu_only"}' in metrics.text
    assert api.get("/openapi.json").status_code == 200
