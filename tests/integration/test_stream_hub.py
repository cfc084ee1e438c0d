"""Generation streams are read through one XREAD per process, in order, whatever the number of readers."""

from __future__ import annotations

import threading
import time

import redis

from nexus.inference.streams import EventWriter, read_batches
from nexus.inference.types import StreamDelta, Usage
from tests.support import wait_for

READERS = 40
CLIENT_NAME = "hub-test"  # CLIENT LIST tells this test's connections from the session's


def _never_idle(_seconds):
    raise AssertionError("a stream went idle for a whole second")


def _read_all(client, job_id) -> tuple[str, Usage | None]:
    text, usage = [], None
    for batch in read_batches(client, job_id, _never_idle):
        for event in batch:
            if isinstance(event, StreamDelta):
                text.append(event.text)
            elif isinstance(event, Usage):
                usage = event
    return "".join(text), usage


def _xread_connections(client) -> int:
    """This client's connections blocked in XREAD now (the session's API reads the same Redis through its own
    hub). `cmd` is a connection's last command, so an idle pooled connection that once read counts only
    while blocked (`b` among its flags)."""
    return sum(1 for c in client.client_list()
               if c.get("cmd") == "xread" and "b" in c.get("flags", "") and c.get("name") == CLIENT_NAME)


def test_many_readers_share_one_blocked_read_and_each_gets_its_own_text_in_order(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5, client_name=CLIENT_NAME)
    results: dict[int, tuple[str, Usage | None]] = {}

    def reader(i: int) -> None:
        results[i] = _read_all(client, f"hub-test-{i}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every reader is waiting now
    # One XREAD per reader held a connection each (40 blocked XREADs); the hub holds one.
    assert _xread_connections(client) <= 1
    writers = {i: EventWriter(client, f"hub-test-{i}", 60, interval_ms=0) for i in range(READERS)}
    for step in range(30):
        for i, writer in writers.items():
            writer.delta(StreamDelta(0, f"{i}:{step} "))
    for writer in writers.values():
        writer.usage(Usage(3, 30))
    for thread in threads:
        thread.join(10)
    assert all(results[i] == ("".join(f"{i}:{step} " for step in range(30)), Usage(3, 30)) for i in range(READERS))


def test_a_reader_that_stops_early_is_forgotten_and_others_go_on(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    writer = EventWriter(client, "hub-early", 60, interval_ms=0)
    writer.delta(StreamDelta(0, "first"))
    batches = read_batches(client, "hub-early", _never_idle)
    assert next(batches)[0].text == "first"
    batches.close()  # the client went away
    from nexus.inference.streams import hub_for

    hub = hub_for(client)
    wait_for(lambda: not hub._subscriptions and not hub._reading, timeout=5, what="the hub's loop stopped")
    EventWriter(client, "hub-late", 60).usage(Usage(1, 0))
    assert _read_all(client, "hub-late") == ("", Usage(1, 0))
