"""Completion notices through Redis: waiters wake at once, metrics count durations.

Best effort by design: PostgreSQL holds the truth, so a lost notice only means
a waiter falls back to reading the row.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable

import redis

from nexus.jobs.records import Outcome

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
DURATION_KEY = "nexus:metrics:duration:{type}"


def job_channel(job_id: object) -> str:
    return f"nexus:job:{job_id}"


class Notifier:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def job_finished(self, row: Outcome) -> None:
        if row.state not in ("succeeded", "failed", "cancelled", "retrying"):
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.publish(job_channel(row.id), json.dumps({"state": row.state, "attempt": row.attempt}))
            seconds = row.run_seconds
            if seconds is not None and row.state == "succeeded":
                key = DURATION_KEY.format(type=row.type)
                seconds = float(seconds)
                bucket = next((b for b in DURATION_BUCKETS if seconds <= b), "+Inf")
                pipe.hincrby(key, str(bucket), 1)
                pipe.hincrby(key, "count", 1)
                pipe.hincrbyfloat(key, "sum", seconds)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("completion notice for %s not sent: %s", row.id, exc)


class ChildNotices:
    """A parent job's wait for its children: it wakes when one of them ends, not at its next poll.

    The parents that wait for children (batch inference, proofs, benchmarks) read their children's rows
    in a loop and slept a fixed interval between reads, so each noticed its last child up to that
    interval late (0.2 s for a batch, 0.5 s for a proof). Here a parent subscribes to the completion
    notices of the children it still waits for; its reads stay the truth, and a notice only ends a
    sleep early. A lost notice, or Redis away, costs what polling did: the sleep runs to its end."""

    def __init__(self, client: redis.Redis | None, sleep: Callable[[float], None],
                 check: Callable[[], None]) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True) if client is not None else None
        self._sleep, self._check = sleep, check
        self._watched: set[str] = set()

    def sleep(self, seconds: float, pending: Iterable[object]) -> None:
        """Up to `seconds`, until a notice of one of the `pending` children (the children not yet final).

        Returns at once when it subscribed to a child it did not watch before: that child may have
        ended between the caller's read and the subscription, so the caller reads again first."""
        if self._pubsub is None:
            return self._sleep(seconds)
        try:
            new = {str(child) for child in pending} - self._watched
            if new:
                self._pubsub.subscribe(*(job_channel(child) for child in sorted(new)))
                self._watched |= new
                return None
            deadline = time.monotonic() + seconds
            while (remaining := deadline - time.monotonic()) > 0:
                self._check()
                if self._pubsub.get_message(timeout=min(0.1, remaining)) is not None:
                    return None
        except redis.RedisError as exc:
            log.warning("children's notices unavailable (%s); polling", exc)
            self.close()
            self._pubsub = None
            return self._sleep(seconds)
        return None

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except redis.RedisError:
                pass

    def __enter__(self) -> "ChildNotices":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
