"""The API and the reconciler reach Redis as ACL users of their own (DEPLOYMENT.md, "Credentials"): each may do
its work on the broker (queues, notices, streams, scripts) and nothing administrative, and neither holds the
default user's login.

Before they had their own users, both processes' NEXUS_REDIS_URL was the default user's: every command,
CONFIG and ACL included.
"""

from __future__ import annotations

import uuid

import pytest
import redis

from nexus.credentials import API_REDIS_USER, RECONCILER_REDIS_USER
from tests.security.test_worker_credentials import process_environment
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)

ADMIN_COMMANDS = (("CONFIG", "SET", "appendonly", "no"), ("CONFIG", "GET", "requirepass"), ("ACL", "LIST"),
                  ("ACL", "SETUSER", "default", "on", "nopass", "+@all"), ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"),
                  ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "127.0.0.1", "1"), ("MONITOR",))


@pytest.fixture(scope="module")
def service_urls(api_process, reconciler):
    """Each process's NEXUS_REDIS_URL, read from its environment as an intruder would."""
    return {API_REDIS_USER: process_environment(api_process.process.pid)["NEXUS_REDIS_URL"],
            RECONCILER_REDIS_USER: process_environment(reconciler.process.pid)["NEXUS_REDIS_URL"]}


@pytest.mark.parametrize("user", [API_REDIS_USER, RECONCILER_REDIS_USER])
def test_each_service_logs_in_as_its_own_user_and_does_its_work(service_urls, user, settings, redis_server):
    url = service_urls[user]
    assert url.startswith(f"redis://{user}:") and url != settings.redis_url
    client = redis.Redis.from_url(url, socket_timeout=5)
    # What the services do on the broker: publish messages and bindings, notices, token streams, scripts.
    queue, stream = f"probe-{uuid.uuid4()}", f"nexus:probe:{uuid.uuid4()}"
    assert client.lpush(queue, "message") == 1 and client.rpop(queue) == b"message"
    client.sadd("_kombu.binding.probe", "probe") and client.delete("_kombu.binding.probe")
    client.publish("nexus:job:probe", "{}")
    client.xadd(stream, {"delta": "x"}) and client.xread({stream: 0}, count=1) and client.delete(stream)
    assert client.eval("return 1", 0) == 1
    # The live processes really use it: the server lists their connections under that user.
    wait_for(lambda: any(c["user"] == user for c in redis_server.client().client_list()), timeout=30,
             what=f"a connection of {user}")


@pytest.mark.parametrize("user", [API_REDIS_USER, RECONCILER_REDIS_USER])
def test_no_service_user_may_administer_the_broker(service_urls, user, services):
    client = redis.Redis.from_url(service_urls[user], socket_timeout=5)
    for command in ADMIN_COMMANDS:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert services.redis.ping()  # the broker is still up
