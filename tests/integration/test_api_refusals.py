"""A token refused for its request rate is answered before authentication, the database and Redis
(nexus.api.refusals): its retries cost the API almost nothing, and other tokens and the node routes
are served as before. Real PostgreSQL and Redis behind the real Flask app."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import event

from tests.conftest import auth
from tests.integration.test_api_limits import limited, token

pytestmark = pytest.mark.timeout(120)

RETRIES = 300


class StatementCount:
    """Statements the API's engines send to PostgreSQL while the block runs (the autocommit engine of
    reads and single statements keeps its own listeners: both are watched)."""

    def __init__(self, *engines):
        self.engines, self.count = engines, 0

    def _seen(self, *_args):
        self.count += 1

    def __enter__(self):
        for engine in self.engines:
            event.listen(engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_exc):
        for engine in self.engines:
            event.remove(engine, "before_cursor_execute", self._seen)


def redis_commands(redis) -> int:
    """Commands the Redis server has run, all clients together, but the INFO calls that ask."""
    stats = redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


def test_a_refused_tokens_retries_touch_neither_the_database_nor_redis(api, services):
    # No token cache (the session's settings): before, every one of these retries looked the token up.
    assert services.settings.auth_cache_seconds == 0
    _, client = limited(services, rate_limit="3/minute")
    alice, bob = auth(token(api, "alice")), auth(token(api, "bob", tenant="b"))
    assert [client.get("/api/v1/jobs", headers=alice).status_code for _ in range(3)] == [200] * 3
    first = client.get("/api/v1/jobs", headers=alice)
    assert first.status_code == 429 and 0 < int(first.headers["Retry-After"]) <= 60

    redis_before = redis_commands(services.redis)
    with StatementCount(services.engine, services.statements) as statements:
        retries = [client.post("/api/v1/jobs", headers=alice, json={"type": "noop"}) for _ in range(RETRIES)]
    redis_used = redis_commands(services.redis) - redis_before
    assert {r.status_code for r in retries} == {429}
    assert statements.count == 0, f"{statements.count} statements for {RETRIES} refused requests"
    # Other processes of the session (workers polling their queues) use the same server: a margin.
    assert redis_used < RETRIES / 3, f"{redis_used} Redis commands for {RETRIES} refused requests"
    refused = retries[-1]
    assert refused.json["error"]["code"] == "too_many_requests" and refused.headers["Retry-After"].isdigit()
    assert int(refused.headers["Retry-After"]) <= int(first.headers["Retry-After"])
    v1 = client.post("/v1/chat/completions", headers=alice, json={"model": "m", "messages": []})
    assert v1.status_code == 429 and v1.json["error"]["type"] == "rate_limit_error"  # OpenAI's shape on /v1

    # Everyone else is served: another token, health, and the node routes for the refused token too.
    assert client.get("/api/v1/jobs", headers=bob).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/v1/nodes", headers=alice).status_code in (200, 403)


def test_a_refused_token_is_served_again_once_it_waited_as_told(api, services):
    _, client = limited(services, rate_limit="2/second")
    alice = auth(token(api, "alice"))
    answers = [client.get("/api/v1/jobs", headers=alice) for _ in range(4)]
    assert [a.status_code for a in answers][:2] == [200, 200] and answers[-1].status_code == 429
    time.sleep(int(answers[-1].headers["Retry-After"]) + 1.5)
    assert client.get("/api/v1/jobs", headers=alice).status_code == 200


def test_a_token_holding_all_its_long_polls_is_refused_more_before_the_database(api, services):
    """A flooding tenant's extra long-polls (each answered 429 at once, retried at once) were the bulk
    of bench/fairness.py's flood: they are refused before authentication; its plain reads are served."""
    from nexus.api.limits import Slots
    from nexus.auth import Principal, Role
    from tests.integration.test_api_limits import _token_id

    custom, client = limited(services, max_long_polls_per_token=1)
    alice = auth(token(api, "alice"))
    job = client.post("/api/v1/jobs", headers=alice, json={"type": "noop", "requirements": {"tier": "gpu_peer"}}).json
    principal = Principal(_token_id(services, "alice"), "alice", Role.SUBMITTER, "a")
    held = Slots(services.redis, "long_poll").acquire(principal, 1, 30, "long-polls")  # another poll holds it
    try:
        first = client.get(f"/api/v1/jobs/{job['id']}?wait=5", headers=alice)
        assert first.status_code == 429 and first.headers["Retry-After"] == "1", first.json
        redis_before = redis_commands(services.redis)
        with StatementCount(services.engine, services.statements) as statements:
            retries = [client.get(f"/api/v1/jobs/{job['id']}?wait=5", headers=alice) for _ in range(RETRIES)]
        redis_used = redis_commands(services.redis) - redis_before
        assert {r.status_code for r in retries} == {429}
        assert retries[-1].json["error"]["details"]["refused_for"] == "long_poll"
        assert statements.count == 0 and redis_used < RETRIES / 3, (statements.count, redis_used)
        assert client.get(f"/api/v1/jobs/{job['id']}", headers=alice).status_code == 200  # no slot needed
    finally:
        Slots(services.redis, "long_poll").release(principal, held)


def test_the_python_client_waits_out_a_429_as_retry_after_says(services, live_api):
    """Against the real gunicorn API: every long-poll slot of the token is taken for half a second;
    NexusClient's long-poll is refused, waits Retry-After, and is then served instead of raising."""
    import threading

    from nexus.api.limits import Slots
    from nexus.auth import Principal, Role
    from nexus.client import NexusClient

    url, admin_token = live_api
    created = NexusClient(url, admin_token).request("POST", "/api/v1/tokens",
                                                    json={"name": "patient", "role": "submitter", "tenant": "p"})
    client = NexusClient(url, created["token"])
    job = client.submit("noop", requirements={"tier": "gpu_peer"})  # nobody runs it: the poll waits it out
    principal = Principal(uuid.UUID(created["id"]), "patient", Role.SUBMITTER, "p")
    slots = Slots(services.redis, "long_poll")
    held = [slots.acquire(principal, 100, 30, "long-polls") for _ in range(services.settings.max_long_polls_per_token)]
    threading.Timer(0.5, lambda: [slots.release(principal, slot) for slot in held]).start()
    began = time.monotonic()
    answer = client.get(job["id"], wait=0.5)
    assert answer["state"] == "queued" and time.monotonic() - began >= 1.0  # refused once, then served
