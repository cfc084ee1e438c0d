"""Completion notices through Redis: waiters wake at once, metrics count durations.

Best effort by design: PostgreSQL holds the truth, so a lost notice only means
a waiter falls back to reading the row.
"""

from __future__ import annotations


import json
import logging

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
