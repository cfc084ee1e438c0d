"""What a /v1 request passes before it becomes a job, in one Redis round trip.

A /v1 request used to make four round trips to Redis before its job row was
inserted, one after the other: the token's request rate (Flask-Limiter, in
before_request), one of the token's stream slots (nexus.api.limits.Slots), a
serving slot of the model (nexus.models.admission) and the wake-up of the
process's StreamHub with the request's stream. On the shared 2-core machine
each cost 0.3-1 ms of a request's time to first token. Here one Lua script does
all four, in that order and with the same scripts' semantics, so what a request
is refused for and what it holds are as before:

- the rate: the counters Flask-Limiter keeps for every other route of the token
  (the same keys and limits' own sliding-window script), so /v1 and /api/v1 share
  one budget; the /v1 routes are exempt from the before_request check instead;
- then a stream slot, only if the rate admitted the request;
- then a serving slot (none taken when every instance is full: the caller then
  waits for one through Admission.acquire, as before);
- then the hub's wake-up, so its blocking read includes the request's stream
  before the job exists (the job id is chosen before the insert).

A request refused before it reaches the script (a bad body, an unknown model)
still counts against the rate, with the rate alone (`count_rate`), as every
request does.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass
from typing import Any

import flask
from flask import current_app
from flask_limiter import Limiter, RateLimitExceeded, RequestLimit
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from nexus.api.limits import ACQUIRE_SCRIPT, SLOT_MARGIN_SECONDS, Slots, rate_exempt
from nexus.auth import Principal
from nexus.inference.streams import WAKE_TTL_SECONDS
from nexus.models.admission import INFLIGHT_KEY, TAKE_SCRIPT, Admission
from nexus.models.liveness import SERVING_KEY, SLOTS_KEY



def _as_function(name: str, script: str | bytes) -> str:
    """A script that reads KEYS and ARGV, as a local Lua function of those two tables."""
    text = script.decode() if isinstance(script, bytes) else script  # limits ships its scripts as bytes
    return f"local function {name}(KEYS, ARGV)\n{text}\nend\n"


def _script() -> str:
    return (_as_function("rate", RedisStorage.SCRIPT_ACQUIRE_SLIDING_WINDOW) + _as_function("slot", ACQUIRE_SCRIPT)
            + _as_function("take", TAKE_SCRIPT) + _MAIN)


# KEYS: 2 per rate limit (previous, current window), then [stream slots, serving, slots hash, in-flight, wake].
# ARGV: number of limits, (limit, expiry, cost) per limit, then what to do beyond the rate ('rate', 'check':
# whether a stream slot is free, 'all'), now, stream slot expiry, stream slot limit, stream slot id, request id,
# serving slot lapse, default slots, the wake stream's TTL.
# Returns {outcome, the breached limit's position (1-based) for a rate refusal}.
_MAIN = """
local limits = tonumber(ARGV[1])
local k, a = 1, 2
for i = 1, limits do
  if not rate({KEYS[k], KEYS[k + 1]}, {ARGV[a], ARGV[a + 1], ARGV[a + 2]}) then return {2, i} end
  k, a = k + 2, a + 3
end
local mode, now = ARGV[a], ARGV[a + 1]
if mode == 'rate' then return {1, 0} end
if mode == 'check' then  -- would a stream slot be free (the request ends before it needs one)
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
  if redis.call('ZCARD', KEYS[k]) >= tonumber(ARGV[a + 3]) then return {3, 0} end
  return {1, 0}
end
if slot({KEYS[k]}, {now, ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]}) == 0 then return {3, 0} end
local taken = take({KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]}, {now, ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]})
if taken == -1 then return {5, 0} end
redis.call('XADD', KEYS[k + 4], 'MAXLEN', '1', '*', 'w', '1')
redis.call('EXPIRE', KEYS[k + 4], ARGV[a + 8])
if taken == 0 then return {4, 0} end
return {1, 0}
"""


class Outcome(enum.IntEnum):
    ADMITTED = 1  # rate counted, stream slot and serving slot taken
    RATE_LIMITED = 2  # nothing taken
    NO_STREAM_SLOT = 3  # rate counted, nothing taken
    MODEL_BUSY = 4  # rate counted, stream slot taken, no serving slot: wait for one
    NO_INSTANCE = 5  # rate counted, stream slot taken, no instance of the model serves


@dataclass(frozen=True)
class Entry:
    outcome: Outcome
    stream_slot: str  # the stream slot's id (held unless refused before it)
    request_id: str  # the serving slot's member


class Gate:
    """The app's gate for /v1 requests (one per app: its limiter, slots and admission)."""

    def __init__(self, redis, limiter: Limiter | None, stream_slots: Slots, admission: Admission) -> None:
        self._limiter, self._slots, self._admission = limiter, stream_slots, admission
        self._script = redis.register_script(_script())

    # --- the rate, as Flask-Limiter counts it ----------------------------------------------

    def _rate_limits(self) -> list[tuple[Any, list[str]]]:
        """(Flask-Limiter's RuntimeLimit, its key arguments) of each application limit for this request."""
        limiter = self._limiter
        if limiter is None or rate_exempt():
            return []
        endpoint, out = flask.request.endpoint or "", []
        for lim in sorted(limiter.limit_manager.application_limits, key=lambda x: x.limit):
            # Not `lim.is_exempt`: the application limits' exemption skips these views, which count here.
            if lim.method_exempt:
                continue
            args = [lim.key_func(), lim.scope_for(endpoint, flask.request.method)]
            if not all(args):
                continue
            out.append((lim, [limiter._key_prefix, *args] if limiter._key_prefix else args))
        return out

    def _foldable(self) -> bool:
        """Whether the limiter keeps sliding-window counters in Redis, which the script updates itself."""
        limiter = self._limiter
        return limiter is None or (isinstance(limiter.limiter, SlidingWindowCounterRateLimiter)
                                   and isinstance(limiter.limiter.storage, RedisStorage))

    def _rate_keys_and_args(self, limits) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [len(limits)]
        if not limits:
            return keys, args
        storage = self._limiter.limiter.storage  # type: ignore[union-attr]
        for lim, key_args in limits:
            key = lim.limit.key_for(*key_args)
            keys += [storage.prefixed_key(storage._previous_window_key(key)),
                     storage.prefixed_key(storage._current_window_key(key))]
            args += [lim.limit.amount, lim.limit.get_expiry(), lim.deduction_amount]
        return keys, args

    def _refuse_rate(self, lim, key_args) -> None:
        """Flask-Limiter's own refusal: its error handler answers with the limit's Retry-After."""
        self._limiter.context.view_rate_limit = RequestLimit(self._limiter, lim.limit, key_args, True,  # type: ignore
                                                             lim.shared)
        raise RateLimitExceeded(lim)

    def count_rate(self, principal: Principal | None = None, stream_limit: int = 0) -> None:
        """Count a request that ends before the gate against the token's rate: RateLimitExceeded when
        over. With `principal`: then the stream slots' 429 when the token holds all of them, as a
        request refused after it took its slot was refused for that first."""
        limits = self._rate_limits()
        if not self._foldable():
            self._hit_in_python(limits)
            limits = []
        if not limits and principal is None:
            return
        keys, args = self._rate_keys_and_args(limits)
        if principal is None:
            args += ["rate", 0]
        else:
            keys.append(self._slots.key(principal))
            args += ["check", time.time(), 0, stream_limit]
        outcome, breached = self._run(keys, args)
        if outcome == Outcome.RATE_LIMITED:
            self._refuse_rate(*limits[breached - 1])
        if outcome == Outcome.NO_STREAM_SLOT:
            raise self._slots.refused(stream_limit, "/v1 completions")

    def _hit_in_python(self, limits) -> None:
        for lim, key_args in limits:
            if not self._limiter.limiter.hit(lim.limit, *key_args, cost=lim.deduction_amount):  # type: ignore
                self._refuse_rate(lim, key_args)

    def _run(self, keys: list[str], args: list[Any]) -> tuple[int, int]:
        outcome, detail = self._script(keys=keys, args=args)
        return int(outcome), int(detail)

    # --- the whole gate ---------------------------------------------------------------------

    def enter(self, principal: Principal, model: str, stream_limit: int, stream_hold_seconds: float,
              serving_hold_seconds: float, wake_key: str, now: float) -> Entry:
        """Count the rate, take a stream slot and a serving slot, wake the hub: one round trip.

        Raises RateLimitExceeded or the stream slots' 429 (nothing held then); otherwise the
        caller holds the stream slot (and the serving slot when ADMITTED)."""
        limits = self._rate_limits()
        if not self._foldable():
            self._hit_in_python(limits)
            limits = []
        keys, args = self._rate_keys_and_args(limits)
        stream_slot, request_id = uuid.uuid4().hex, uuid.uuid4().hex
        keys += [self._slots.key(principal), SERVING_KEY.format(model=model), SLOTS_KEY.format(model=model),
                 INFLIGHT_KEY.format(model=model), wake_key]
        args += ["all", now, now + stream_hold_seconds + SLOT_MARGIN_SECONDS, stream_limit, stream_slot, request_id,
                 now + serving_hold_seconds, self._admission.default_slots, WAKE_TTL_SECONDS]
        outcome, breached = self._run(keys, args)
        if outcome == Outcome.RATE_LIMITED:
            self._refuse_rate(*limits[breached - 1])
        if outcome == Outcome.NO_STREAM_SLOT:
            raise self._slots.refused(stream_limit, "/v1 completions")
        return Entry(Outcome(outcome), stream_slot, request_id)


def gate() -> Gate:
    """The app's gate, made on first use (the app's limiter, its stream slots, the admission)."""
    extensions = current_app.extensions
    if "nexus_v1_gate" not in extensions:
        services = extensions["nexus"]
        extensions["nexus_v1_gate"] = Gate(services.redis, extensions.get("nexus_limiter"),
                                           extensions["nexus_slots"]["stream"], services.admission)
    return extensions["nexus_v1_gate"]
