"""The consumption verdict of a worker's self-probe (nexus.queueing.health.verdict): pure logic."""

from __future__ import annotations

import pytest

from nexus.queueing.health import BUSY, CONSUMING, NOT_CONSUMING, UNKNOWN, verdict

TIMEOUT = 30.0


@pytest.mark.parametrize("waiting, in_queue, answered, saturated, expected", [
    (1.0, False, True, False, CONSUMING),  # the probe came back
    (99.0, True, True, True, CONSUMING),  # answered wins over everything else
    (99.0, True, False, True, BUSY),  # every slot taken: the probe waits its turn, no verdict on consumption
    (None, False, False, False, UNKNOWN),  # nothing sent yet
    (10.0, True, False, False, UNKNOWN),  # waiting, not overdue
    (99.0, False, False, False, UNKNOWN),  # gone from the queue unanswered: lost with the broker's data
    (TIMEOUT, True, False, False, UNKNOWN),  # exactly at the limit is not over it
    (TIMEOUT + 0.1, True, False, False, NOT_CONSUMING),  # waiting in the queue, free slots, too long
])
def test_verdict(waiting, in_queue, answered, saturated, expected):
    assert verdict(waiting, in_queue, answered, saturated, TIMEOUT) == expected


def test_the_supervisor_restarts_a_child_its_hook_calls_stuck():
    import sys
    import time

    from nexus.supervisor import ChildSpec, RestartPolicy, Supervisor

    stuck: set[int] = set()
    spec = ChildSpec("sleeper", (sys.executable, "-c", "import time; time.sleep(60)"))
    supervisor = Supervisor([spec], RestartPolicy(0.0, 0.0, 60.0), unhealthy=lambda pid: pid in stuck)
    supervisor.start()
    try:
        first = supervisor.status()[0]["pid"]
        supervisor.poll()
        assert supervisor.status()[0]["pid"] == first  # healthy: left alone
        stuck.add(first)
        deadline = time.monotonic() + 20
        while supervisor.status()[0]["pid"] in (None, first) and time.monotonic() < deadline:
            supervisor.poll()
            time.sleep(0.05)
        assert supervisor.status()[0]["pid"] not in (None, first)
        assert [e.kind for e in supervisor.events] == ["started", "exited", "started"]
    finally:
        supervisor.stop(grace_seconds=5)
