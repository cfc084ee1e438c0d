"""Admission for /v1 requests: at most the model's serving slots in flight, the rest wait, then 429.

Each serving worker announces its instance with the requests it runs at once
(its max_concurrent, `liveness.announce`). The API takes a slot before it
submits a request and gives it back when the request ends; a slot is a member
of one sorted set per model, scored with the time it lapses, so slots of an API
process that died come back on their own after the request timeout. One Lua
script counts the live capacity and takes a slot atomically, for every API
process alike. A request that finds no slot waits up to
`inference_admission_wait_seconds`, then the caller answers 429: nothing queues
without bound, nothing is dropped silently.

The waiting requests of one API process stand in line per model, in arrival
order, and only the first of the line tries for a slot: a release in the same
process wakes it at once, a release elsewhere (another API process, a slot that
lapsed) is found by its polling, and when it leaves the line, with a slot or
without, the next one becomes first and tries at once. Every waiter polled for
itself before: with 240 requests waiting at 256 in flight, that was about 500
slot scripts a second on the API's and Redis's CPUs, which the engine shares on
a small machine. Each waiting request is also a member of the model's waiting
set (scored with when its wait lapses), so how many wait is observable
(`load`: the model's view in /api/v1/models and the `nexus_model_requests`
metric), as are the slots in use and the live capacity.

    slot = Admission(redis).acquire(model, request_id, hold_seconds, wait_seconds)
    ...
    slot.release()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import redis

from nexus.models.liveness import SERVING_KEY, SLOTS_KEY

INFLIGHT_KEY = "nexus:inflight:{model}"
WAITING_KEY = "nexus:waiting:{model}"  # request id -> when its wait lapses
POLL_SECONDS = (0.005, 0.5)  # first and longest wait between tries when no release wakes us


def _capacity_lua(default_slots: str) -> str:
    """Lua that sums the slots of the model's live instances into `capacity` (KEYS[1] the serving zset,
    KEYS[2] the slots hash, ARGV[1] now; `default_slots` the argument for an instance that announced none)."""
    return f"""
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local capacity = 0
for _, id in ipairs(live) do
  capacity = capacity + (tonumber(redis.call('HGET', KEYS[2], id)) or tonumber({default_slots}))
end
"""


# KEYS: serving zset, slots hash, in-flight zset. ARGV: now, request id, lapse time, default slots.
TAKE_SCRIPT = _capacity_lua("ARGV[4]") + """redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[3]) < capacity then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], math.ceil(ARGV[3] - ARGV[1]) + 60)
  return 1
end
return capacity == 0 and -1 or 0
"""

# The capacity, with the slots in use and the requests waiting. KEYS: serving zset, slots hash, in-flight
# zset, waiting zset. ARGV: now, default slots.
LOAD_SCRIPT = _capacity_lua("ARGV[2]") + """return {capacity, redis.call('ZCOUNT', KEYS[3], ARGV[1], '+inf'),
        redis.call('ZCOUNT', KEYS[4], ARGV[1], '+inf')}
"""


class NoInstance(RuntimeError):
    """No instance of the model is serving (distinct from all of them being full)."""


@dataclass(frozen=True)
class ModelLoad:
    """A model's serving slots now, over every API process."""

    capacity: int  # slots of its live instances
    in_flight: int  # taken by requests
    waiting: int  # requests waiting for one


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
        self._load = client.register_script(LOAD_SCRIPT)
        self._lines: dict[str, deque[threading.Event]] = {}  # per model; greenlet-friendly under gevent
        self._lock = threading.Lock()

    @property
    def default_slots(self) -> int:
        """The slots of an instance that announced none."""
        return self._default

    def try_acquire(self, model: str, request_id: str, hold_seconds: float) -> bool:
        now = time.time()
        keys = [SERVING_KEY.format(model=model), SLOTS_KEY.format(model=model), INFLIGHT_KEY.format(model=model)]
        taken = self._take(keys=keys, args=[now, request_id, now + hold_seconds, self._default])
        if taken == -1:
            raise NoInstance(model)
        return taken == 1

    def acquire(self, model: str, request_id: str, hold_seconds: float, wait_seconds: float) -> Slot | None:
        """A slot, waiting in this process's line for the model up to `wait_seconds`; None when none came
        free in time."""
        if self.try_acquire(model, request_id, hold_seconds):
            return Slot(self, model, request_id)
        deadline, pause = time.monotonic() + wait_seconds, POLL_SECONDS[0]
        me, line = threading.Event(), self._line(model)
        self._mark_waiting(model, request_id, time.time() + wait_seconds)
        with self._lock:
            line.append(me)
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                woken = me.wait(min(pause, remaining) if self._first(line, me) else remaining)
                me.clear()
                if not self._first(line, me):
                    continue  # woken for nothing: only the first of the line tries
                if self.try_acquire(model, request_id, hold_seconds):
                    return Slot(self, model, request_id)
                pause = POLL_SECONDS[0] if woken else min(pause * 2, POLL_SECONDS[1])
            return None
        finally:
            with self._lock:
                was_first = line[0] is me
                line.remove(me)
                if was_first and line:
                    line[0].set()  # the next one tries at once
            self._redis.zrem(WAITING_KEY.format(model=model), request_id)

    def release(self, model: str, request_id: str) -> None:
        self._redis.zrem(INFLIGHT_KEY.format(model=model), request_id)
        with self._lock:
            line = self._lines.get(model)
            if line:
                line[0].set()  # the first waiter of this process takes the slot; the others keep waiting

    def load(self, model: str) -> ModelLoad:
        keys = [SERVING_KEY.format(model=model), SLOTS_KEY.format(model=model), INFLIGHT_KEY.format(model=model),
                WAITING_KEY.format(model=model)]
        capacity, in_flight, waiting = self._load(keys=keys, args=[time.time(), self._default])
        return ModelLoad(int(capacity), int(in_flight), int(waiting))

    def _line(self, model: str) -> deque[threading.Event]:
        with self._lock:
            return self._lines.setdefault(model, deque())

    def _first(self, line: deque[threading.Event], me: threading.Event) -> bool:
        with self._lock:
            return line[0] is me

    def _mark_waiting(self, model: str, request_id: str, lapses_at: float) -> None:
        key = WAITING_KEY.format(model=model)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(key, {request_id: lapses_at})
        pipe.zremrangebyscore(key, "-inf", time.time())  # waits of API processes that died
        pipe.expire(key, max(1, int(lapses_at - time.time()) + 60))
        pipe.execute()
