"""A process's Redis pool holds as many connections as the API holds requests: on gevent every open
/v1 stream blocks in an XREAD on its own connection, and redis-py's default pool refused the 101st."""

from __future__ import annotations

import threading

import pytest

from nexus.services import Services

pytestmark = pytest.mark.timeout(60)


def test_150_blocking_reads_at_once_all_get_a_connection(services):
    client = Services(services.settings).redis
    errors, ready = [], threading.Barrier(150)

    def read() -> None:
        ready.wait()
        try:
            client.xread({"nexus:test:nothing": "0-0"}, block=1000)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=read) for _ in range(150)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:3]
