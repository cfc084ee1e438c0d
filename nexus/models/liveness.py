"""Which instances are serving a model right now, in Redis.

Each serving worker re-announces its instance every few seconds with an
expiry time; the API counts unexpired members before it queues a request, so
a model nobody serves gets a 503 at once instead of a request that waits in
a queue no worker reads. The database row says what should run and what was
reported; this says what answered in the last few seconds.
"""

from __future__ import annotations

import time

import redis

SERVING_KEY = "nexus:serving:{model}"
SLOTS_KEY = "nexus:serving:{model}:slots"  # instance -> requests it runs at once (nexus/models/admission.py)


def announce(client: redis.Redis, model: str, instance_id: str, ttl_seconds: float, slots: int | None = None) -> None:
    key = SERVING_KEY.format(model=model)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zadd(key, {instance_id: now + ttl_seconds})
    pipe.zremrangebyscore(key, "-inf", now)  # forget the ones that went silent
    pipe.expire(key, max(1, int(ttl_seconds * 3)))
    if slots is not None:
        pipe.hset(SLOTS_KEY.format(model=model), instance_id, slots)
        pipe.expire(SLOTS_KEY.format(model=model), max(1, int(ttl_seconds * 3)))
    pipe.execute()


def withdraw(client: redis.Redis, model: str, instance_id: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.zrem(SERVING_KEY.format(model=model), instance_id)
    pipe.hdel(SLOTS_KEY.format(model=model), instance_id)
    pipe.execute()


def live_instances(client: redis.Redis, model: str) -> list[str]:
    members = client.zrangebyscore(SERVING_KEY.format(model=model), time.time(), "+inf")
    return [m.decode() if isinstance(m, bytes) else m for m in members]
