"""Admission for /v1 requests: at most the model's serving slots in flight, the rest wait, then 429.

Each serving worker announces its instance with the requests it runs at once
(its max_concurrent, `liveness.announce`). The API takes a slot before it
submits a request and gives it back when the request ends; a slot is a member
of one sorted set per model, scored with the time it lapses, so slots of an API
process that died come back on their own after the request timeout. One Lua
script counts the live capacity and takes a slot atomically, for every API
process alike. A request that finds no slot waits (woken at once by a release
in the same process, otherwise polling) up to `inference_admission_wait_seconds`,
then the caller answers 429: nothing queues without bound, nothing is dropped
silently.

    slot = Admission(redis).acquire(model, request_id, hold_seconds, wait_seconds)
    ...
    slot.release()
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import redis

from nexus.models.liveness import SERVING_KEY, SLOTS_KEY

INFLIGHT_KEY = "nexus:inflight:{model}"
POLL_SECONDS = (0.005, 0.5)  # first and longest wait between tries when no release wakes us

# KEYS: serving zset, slots hash, in-flight zset. ARGV: now, request id, lapse time, default slots.
TAKE_SCRIPT = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local capacity = 0
for _, id in ipairs(live) do
  capacity = capacity + (tonumber(redis.call('HGET', KEYS[2], id)) or tonumber(ARGV[4]))
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[3]) < capacity then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], math.ceil(ARGV[3] - ARGV[1]) + 60)
  return 1
end
return capacity == 0 and -1 or 0
"""


class NoInstance(RuntimeError):
    """No instance of the model is serving (distinct from all of them being full)."""


@dataclass
class Slot:
    admission: "Admission"
    model: str
    request_id: str

    def release(self) -> None:
        self.admission.release(self.model, self.request_id)


class Admission:
    def __init__(self, client: redis.Redis, default_slots: int = 16) -> None:
        self._redis, self._default = client, default_slots
        self._take = client.register_script(TAKE_SCRIPT)
        self._conditions: dict[str, threading.Condition] = {}  # per model; greenlet-friendly under gevent
        self._lock = threading.Lock()

    @property
    def default_slots(self) -> int:
        """The slots of an instance that announced none."""
        return self._default

    def _released(self, model: str) -> threading.Condition:
        with self._lock:
            return self._conditions.setdefault(model, threading.Condition())

    def try_acquire(self, model: str, request_id: str, hold_seconds: float) -> bool:
        now = time.time()
        keys = [SERVING_KEY.format(model=model), SLOTS_KEY.format(model=model), INFLIGHT_KEY.format(model=model)]
        taken = self._take(keys=keys, args=[now, request_id, now + hold_seconds, self._default])
        if taken == -1:
            raise NoInstance(model)
        return taken == 1

    def acquire(self, model: str, request_id: str, hold_seconds: float, wait_seconds: float) -> Slot | None:
        """A slot, waiting up to `wait_seconds` for one; None when none came free in time."""
        deadline, pause = time.monotonic() + wait_seconds, POLL_SECONDS[0]
        while True:
            if self.try_acquire(model, request_id, hold_seconds):
                return Slot(self, model, request_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            released = self._released(model)
            with released:
                released.wait(min(pause, remaining))
            pause = min(pause * 2, POLL_SECONDS[1])

    def release(self, model: str, request_id: str) -> None:
        self._redis.zrem(INFLIGHT_KEY.format(model=model), request_id)
        released = self._released(model)
        with released:
            released.notify()  # one waiter of this process takes the slot; the others keep waiting

    def in_flight(self, model: str) -> int:
        return int(self._redis.zcount(INFLIGHT_KEY.format(model=model), time.time(), "+inf"))
