"""Limits the API enforces: payload and body sizes, internal job types, child fan-out, priority ceilings,
and per-token long-polls, /v1 streams and request rates (429 with Retry-After)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import text

from nexus.api import create_app
from nexus.auth import Principal, Role
from nexus.jobs import lifecycle
from nexus.jobs.context import JobContext
from nexus.services import Services
from tests.conftest import auth
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)


def limited(services: Services, **settings) -> tuple[Services, object]:
    """Services and a test client whose Settings differ; the connections are the session's."""
    custom = Services(services.settings.model_copy(update=settings))
    for name in ("engine", "statements", "celery", "redis", "store"):
        custom.__dict__[name] = getattr(services, name)
    return custom, create_app(custom.settings, custom).test_client()


def job_count(services, where: str = "TRUE") -> int:
    with services.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM jobs WHERE {where}")).scalar()


def token(api, name: str, role: str = "submitter", tenant: str = "a") -> str:
    created = api.post("/api/v1/tokens", json={"name": name, "role": role, "tenant": tenant}, headers=auth())
    assert created.status_code == 201, created.json
    return created.json["token"]


# --- sizes ----------------------------------------------------------------------------------------
def test_oversize_payloads_and_bodies_are_413_and_store_nothing(api, services):
    settings = services.settings
    huge = api.post("/api/v1/jobs", headers=auth(), json={"type": "noop", "payload": {"echo": "x" * (16 << 20)}})
    assert huge.status_code == 413 and huge.json["error"]["code"] == "payload_too_large"
    assert str(settings.max_body_bytes) in huge.json["error"]["message"]
    over = {"type": "noop", "payload": {"echo": "x" * settings.max_payload_bytes}}
    single = api.post("/api/v1/jobs", headers=auth(), json=over)
    assert single.status_code == 413, single.json
    assert single.json["error"]["details"]["max_payload_bytes"] == settings.max_payload_bytes
    bulk = api.post("/api/v1/jobs/bulk", headers=auth(), json={"jobs": [{"type": "noop"}, over]})
    assert bulk.status_code == 413 and bulk.json["error"]["details"]["index"] == 1
    assert job_count(services) == 0
    # Uploads keep their own, larger limit.
    upload = api.post("/api/v1/inputs", data=b"x" * (settings.max_body_bytes + 1), headers=auth())
    assert upload.status_code == 201, upload.json
    too_big = api.post("/api/v1/inputs", data=b"x" * (settings.max_input_bytes + 1), headers=auth())
    assert too_big.status_code == 413 and str(settings.max_input_bytes) in too_big.json["error"]["message"]


# --- internal job types ---------------------------------------------------------------------------
@pytest.mark.parametrize("job", [
    {"type": "inference_chunk", "payload": {"model": "m", "key": "jobs/other-tenant/chunks/00000.jsonl",
                                            "first_line": 0}},
    {"type": "proof_segment", "payload": {}},
    {"type": "completion", "payload": {}},
])
def test_internal_job_types_are_refused_from_the_api(api, services, job):
    for response in (api.post("/api/v1/jobs", headers=auth(), json=job),
                     api.post("/api/v1/jobs/bulk", headers=auth(), json={"jobs": [{"type": "noop"}, job]})):
        assert response.status_code == 400, response.json
        error = response.json["error"]
        assert "internal" in error["message"] and "noop" in error["details"]["public_types"]
        assert job["type"] not in error["details"]["public_types"]
    assert job_count(services) == 0


def test_a_running_job_submits_internal_children_up_to_the_cap(services):
    from nexus.jobs.fanout import TooManyChildren

    custom, _ = limited(services, max_children_per_job=3)
    [(parent, _)] = custom.submitter.submit_many([{"type": "noop", "requirements": {"tier": "gpu_peer"}}], "default")
    with custom.engine.begin() as conn:  # running: children are submitted under the parent's lease
        claimed = lifecycle.claim(conn, parent.id, 1, "n", 60)
    ctx = JobContext(job_id=parent.id, attempt=1, node="n", tenant="default", input_key=None,
                     settings=custom.settings, engine=custom.engine, storage=custom.store, submitter=custom.submitter,
                     lease_token=claimed.lease_token)
    chunk = {"type": "inference_chunk", "payload": {"model": "m", "key": "k", "first_line": 0},
             "requirements": {"model": "m"}}
    specs = [{**chunk, "idempotency_key": f"chunk-{n}"} for n in range(3)]
    assert len(ctx.submit_children(specs)) == 3
    assert len(ctx.submit_children(specs)) == 3  # a retried parent finds its children: not counted twice
    with pytest.raises(TooManyChildren, match="NEXUS_MAX_CHILDREN_PER_JOB"):
        ctx.submit_children([{**chunk, "idempotency_key": "chunk-3"}])
    with pytest.raises(TooManyChildren):
        ctx.submit_children([chunk] * 4)
    assert job_count(services, f"parent_id = '{parent.id}'") == 3


def test_a_batch_whose_chunk_count_is_known_is_refused_at_submit(services):
    _, client = limited(services, max_children_per_job=3)
    batch = {"type": "inference", "payload": {"model": "m", "requests": [{"prompt": "p"}] * 4, "chunk_lines": 1}}
    refused = client.post("/api/v1/jobs", headers=auth(), json=batch)
    assert refused.status_code == 400, refused.json
    assert refused.json["error"]["details"]["children"] == 4 and "NEXUS_MAX_CHILDREN_PER_JOB" in str(refused.json)
    batch["payload"]["chunk_lines"] = 2
    assert client.post("/api/v1/jobs", headers=auth(), json={**batch, "requirements": {"tier": "gpu_peer"}}) \
        .status_code == 201


def test_a_batch_file_with_too_many_chunks_fails_before_writing_any(api, services, worker):
    lines = services.settings.max_children_per_job + 1
    upload = api.post("/api/v1/inputs", data=b'{"prompt": "p"}\n' * lines, headers=auth()).json
    job = api.post("/api/v1/jobs", headers=auth(), json={
        "type": "inference", "payload": {"model": "m", "chunk_lines": 1}, "input_key": upload["key"]}).json
    final = wait_for(lambda: (j := api.get(f"/api/v1/jobs/{job['id']}", headers=auth()).json)["state"]
                     in ("failed", "succeeded") and j, timeout=60, what="the batch to end")
    assert final["state"] == "failed" and final["attempt"] == 1, final  # refused, not retried
    assert f"{lines} child jobs" in final["error"] and "raise chunk_lines to at least 2" in final["error"]
    assert job_count(services, f"parent_id = '{job['id']}'") == 0
    assert not services.store.exists(services.settings.bucket_outputs, f"jobs/{job['id']}/chunks/00000.jsonl")


# --- priorities -----------------------------------------------------------------------------------
def test_priorities_above_the_ceiling_are_refused(api, services):
    alice = auth(token(api, "alice"))
    ceiling = services.settings.submitter_max_priority
    queued = {"type": "noop", "requirements": {"tier": "gpu_peer"}}
    refused = api.post("/api/v1/jobs", headers=alice, json={**queued, "priority": 9})
    assert refused.status_code == 400 and refused.json["error"]["details"]["max_priority"] == ceiling
    bulk = api.post("/api/v1/jobs/bulk", headers=alice, json={"jobs": [queued, {**queued, "priority": ceiling + 1}]})
    assert bulk.status_code == 400 and bulk.json["error"]["details"]["index"] == 1
    proof = api.post("/api/v1/proofs", headers=alice, json={"nonce_end": 10, "priority": 9})
    assert proof.status_code == 400 and "priority" in proof.json["error"]["message"]
    assert job_count(services) == 0
    assert api.post("/api/v1/jobs", headers=alice, json={**queued, "priority": ceiling}).status_code == 201
    assert api.post("/api/v1/jobs", headers=auth(), json={**queued, "priority": 9}).status_code == 201


# --- per-token concurrency and rate ---------------------------------------------------------------
def test_long_polls_per_token_are_capped_and_other_tokens_still_served(api, services):
    _, client = limited(services, max_long_polls_per_token=2)
    alice, bob = token(api, "alice"), token(api, "bob")
    job = client.post("/api/v1/jobs", headers=auth(alice), json={"type": "sleep", "requirements": {"tier": "gpu_peer"}})
    url = f"/api/v1/jobs/{job.json['id']}"
    answers = []
    polls = [threading.Thread(target=lambda: answers.append(client.get(f"{url}?wait=3", headers=auth(alice))))
             for _ in range(2)]
    for poll in polls:
        poll.start()
    alice_id = _token_id(services, "alice")
    wait_for(lambda: services.redis.zcard(f"nexus:slots:long_poll:{alice_id}") == 2, timeout=10, what="two polls")
    refused = client.get(f"{url}?wait=3", headers=auth(alice))
    assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit(), refused.json
    assert refused.json["error"]["code"] == "too_many_requests"
    submit_wait = client.post("/api/v1/jobs?wait=1", headers=auth(alice), json={"type": "noop"})
    assert submit_wait.status_code == 429 and job_count(services) == 1  # refused before a job exists
    assert client.get(url, headers=auth(alice)).status_code == 200  # a plain read needs no slot
    other = client.get(f"/api/v1/jobs/{job.json['id']}?wait=0.2", headers=auth(bob))
    assert other.status_code == 200 and other.json["state"] == "queued"  # bob's long-poll is served
    for poll in polls:
        poll.join()
    assert [a.status_code for a in answers] == [200, 200]
    assert services.redis.zcard(f"nexus:slots:long_poll:{alice_id}") == 0


def test_a_slot_left_by_a_crashed_process_expires(services):
    from nexus.api.limits import Slots

    slots = Slots(services.redis, "long_poll")
    principal = Principal(uuid.uuid4(), "p", Role.SUBMITTER, "a")
    services.redis.zadd(f"nexus:slots:long_poll:{principal.token_id}", {"crashed": time.time() - 1})
    slot = slots.acquire(principal, 1, 5, "long-polls")  # the expired slot no longer counts
    with pytest.raises(Exception, match="at most 1"):
        slots.acquire(principal, 1, 5, "long-polls")
    slots.release(principal, slot)
    assert 0 < services.redis.ttl(f"nexus:slots:long_poll:{principal.token_id}") or \
        not services.redis.exists(f"nexus:slots:long_poll:{principal.token_id}")


def test_v1_requests_per_token_are_capped_in_openais_shape(api, services):
    from nexus.api.limits import Slots

    _, client = limited(services, max_streams_per_token=1)
    alice = token(api, "alice")
    principal = Principal(_token_id(services, "alice"), "alice", Role.SUBMITTER, "a")
    slots = Slots(services.redis, "stream")
    held = slots.acquire(principal, 1, 30, "/v1 completions")
    refused = client.post("/v1/chat/completions", headers=auth(alice), json={"model": "m", "messages": []})
    assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
    assert refused.json["error"]["code"] == "rate_limit_exceeded" and "type" in refused.json["error"]
    slots.release(principal, held)
    time.sleep(int(refused.headers["Retry-After"]) + 0.2)  # refused until then (nexus.api.refusals)
    answered = client.post("/v1/chat/completions", headers=auth(alice), json={"model": "m"})
    assert answered.status_code == 400  # served: a bad body, not a full slot
    answered.close()
    assert services.redis.zcard(f"nexus:slots:stream:{principal.token_id}") == 0  # released with the response


def test_request_rate_per_token_is_429_with_retry_after(api, services):
    _, client = limited(services, rate_limit="3/minute")
    alice, bob = auth(token(api, "alice")), auth(token(api, "bob", tenant="b"))
    assert [client.get("/api/v1/jobs", headers=alice).status_code for _ in range(3)] == [200] * 3
    refused = client.get("/api/v1/jobs", headers=alice)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_requests", refused.json
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    v1 = client.get("/v1/models", headers=alice)
    assert v1.status_code == 429 and v1.json["error"]["type"] == "rate_limit_error" and "Retry-After" in v1.headers
    assert client.get("/api/v1/jobs", headers=bob).status_code == 200  # another token has its own budget
    # Never limited: health and the node routes (heartbeats must not be refused).
    assert all(client.get("/healthz").status_code == 200 for _ in range(5))
    assert all(client.get("/api/v1/nodes", headers=alice).status_code in (200, 403) for _ in range(5))


def _token_id(services, name: str) -> uuid.UUID:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT id FROM api_tokens WHERE name = :n"), {"n": name}).scalar_one()


# --- /v1: one round trip before the job row (nexus.api.v1_gate) ------------------------------------
class _RoundTrips:
    """Counts this thread's Redis round trips (a command, a script, a pipeline) until the job insert,
    which it stops with a 413 so that nothing waits for a worker."""

    def __init__(self, monkeypatch):
        import threading

        import redis as redis_module

        from nexus.jobs.submit import PayloadTooLarge, Submitter

        self.before_insert: list[int] = []
        self.count, thread = 0, threading.get_ident()
        command, pipeline = redis_module.Redis.execute_command, redis_module.client.Pipeline.execute

        def counted(original):
            def call(*args, **kwargs):
                if threading.get_ident() == thread:
                    self.count += 1
                return original(*args, **kwargs)
            return call

        def stop(_submitter, _specs):
            self.before_insert.append(self.count)
            raise PayloadTooLarge("stopped at the insert by the test")

        monkeypatch.setattr(redis_module.Redis, "execute_command", counted(command))
        monkeypatch.setattr(redis_module.client.Pipeline, "execute", counted(pipeline))
        monkeypatch.setattr(Submitter, "submit_specs", stop)


def _serving_model(services, name: str) -> None:
    from nexus.models import catalog, liveness
    from nexus.models.catalog import ModelSpec

    with services.engine.begin() as conn:
        catalog.insert_model(conn, ModelSpec(name, "/models/" + name), replace=True)
    liveness.announce(services.redis, name, str(uuid.uuid4()), 60, slots=4)


def _completion(client, headers, model: str):
    return client.post("/v1/completions", headers=headers, json={"model": model, "prompt": "hi", "max_tokens": 2})


def test_a_v1_request_makes_one_redis_round_trip_before_its_job_row(api, services, monkeypatch):
    _, client = limited(services)
    alice = auth(token(api, "alice"))
    _serving_model(services, "gate-one-trip")
    trips = _RoundTrips(monkeypatch)
    for _ in range(2):  # the first loads the scripts into Redis
        trips.count = 0
        answered = _completion(client, alice, "gate-one-trip")
        assert answered.status_code == 413, answered.json
        answered.close()
    # The rate, a stream slot, a serving slot and the stream hub's wake-up: one script, where they were
    # three round trips and a fourth after the insert.
    assert trips.before_insert[-1] == 1
    assert services.redis.zcard("nexus:inflight:gate-one-trip") == 0  # both slots given back with the answer
    assert services.redis.zcard(f"nexus:slots:stream:{_token_id(services, 'alice')}") == 0


def test_v1_requests_count_against_the_tokens_one_rate_whatever_they_answer(api, services, monkeypatch):
    _, client = limited(services, rate_limit="3/minute")
    alice = auth(token(api, "alice"))
    _serving_model(services, "gate-rate")
    _RoundTrips(monkeypatch)
    bad_body = client.post("/v1/completions", headers=alice, json={"model": "gate-rate", "prompt": []})
    assert bad_body.status_code == 400  # refused before the gate: counted all the same
    assert _completion(client, alice, "gate-rate").status_code == 413  # counted by the gate's script
    assert client.get("/api/v1/jobs", headers=alice).status_code == 200  # the third of the shared budget
    assert client.get("/api/v1/jobs", headers=alice).status_code == 429
    refused = client.post("/v1/completions", headers=alice, json={"model": "gate-rate", "prompt": "x"})
    assert refused.status_code == 429 and refused.json["error"]["type"] == "rate_limit_error"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
