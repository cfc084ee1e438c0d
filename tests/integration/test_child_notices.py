"""ChildNotices on the real Redis: a child's completion notice ends a parent's sleep early; nothing else does."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from nexus.jobs.notify import ChildNotices, Notifier
from nexus.jobs.records import Outcome
from nexus.localservers import free_port


def _finished(job_id: uuid.UUID, state: str = "succeeded") -> Outcome:
    return Outcome(job_id, "noop", state, 1, "n", None, 0.1)


def _slept(notices: ChildNotices, seconds: float, pending) -> float:
    started = time.monotonic()
    notices.sleep(seconds, pending)
    return time.monotonic() - started


def test_a_childs_notice_ends_the_sleep_and_another_jobs_does_not(services):
    child, stranger = uuid.uuid4(), uuid.uuid4()
    sleeps: list[float] = []
    with ChildNotices(services.redis, sleeps.append, lambda: None) as notices:
        assert _slept(notices, 5, [child]) < 0.5  # subscribed to a new child: back at once, to read again
        notifier = Notifier(services.redis)
        threading.Timer(0.3, notifier.job_finished, [_finished(stranger)]).start()
        assert _slept(notices, 1.0, [child]) >= 0.9  # a notice of a job it does not wait for: slept it out
        threading.Timer(0.3, notifier.job_finished, [_finished(child)]).start()
        assert 0.2 < _slept(notices, 10, [child]) < 2  # its child's notice: woken well before the 10 s
    assert sleeps == []  # it never fell back to the plain sleep


def test_with_redis_away_it_sleeps_as_polling_did():
    sleeps: list[float] = []
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    with ChildNotices(away, sleeps.append, lambda: None) as notices:
        notices.sleep(0.2, [uuid.uuid4()])
        notices.sleep(0.3, [uuid.uuid4()])
    assert sleeps == [0.2, 0.3]


def test_without_a_client_it_is_a_plain_sleep():
    sleeps: list[float] = []
    ChildNotices(None, sleeps.append, lambda: None).sleep(0.5, [uuid.uuid4()])
    assert sleeps == [0.5]
