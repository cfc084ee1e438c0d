"""Per-principal limits: priority ceilings, concurrent slots (long-polls, /v1 streams), a request rate.

One token must not be able to starve the others, nor the nodes: 64 long-polls from one
submitter once held every API thread, heartbeats queued behind them and healthy nodes went
offline. Health and the node routes are never limited (DESIGN decision 10), and neither are
worker tokens: heartbeats and lease renewals must not be refused.

Slots are a Redis sorted set per token and kind whose members expire: an API process that
crashes while holding one loses it at its expiry, not forever.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

from flask import Flask, current_app, g, has_request_context, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from nexus.api.errors import ApiError, error_body
from nexus.api.refusals import TOKEN_HASH_KEY, RefusalCache, RefusalGate
from nexus.auth import Principal, Role
from nexus.config import Settings

log = logging.getLogger(__name__)

# Blueprints that agents call (registration, heartbeats, GPU placement, cluster state).
NODE_BLUEPRINTS = frozenset({"nodes", "gpu", "cluster", "health"})
# Views that count the token's rate themselves, in the one round trip of their gate (nexus.api.v1_gate).
SELF_COUNTED_ENDPOINTS = frozenset({"openai.completions", "openai.chat_completions", "openai.embeddings"})
RETRY_AFTER_SECONDS = 1  # a slot frees when any of the caller's own requests ends
SLOT_MARGIN_SECONDS = 10  # a slot outlives its request by this much, then expires on its own

# KEYS[1] the token's set; ARGV: now, expiry of the new slot, limit, slot id. 1 = taken, 0 = full.
ACQUIRE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2])))
return 1
"""


class Slots:
    """Concurrent requests of one kind per token, counted in Redis across every API process."""

    def __init__(self, redis, kind: str, refusals: RefusalCache | None = None):
        self.redis = redis
        self.kind = kind  # nexus.api.refusals.LONG_POLL or STREAM
        self.refusals = refusals  # a refused token's next such requests are answered before Flask
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)

    def key(self, principal: Principal) -> str:
        return f"nexus:slots:{self.kind}:{principal.token_id}"

    def acquire(self, principal: Principal, limit: int, hold_seconds: float, what: str) -> str:
        """A slot id to release, or ApiError 429 when the token holds `limit` already."""
        slot, now = uuid.uuid4().hex, time.time()
        if not self._acquire(keys=[self.key(principal)], args=[now, now + hold_seconds + SLOT_MARGIN_SECONDS,
                                                                  limit, slot]):
            raise self.refused(limit, what)
        return slot

    def refused(self, limit: int, what: str) -> ApiError:
        """The 429 for a token that holds all its slots; this process answers its next such requests itself."""
        self._refuse_here(RETRY_AFTER_SECONDS)
        return ApiError(429, f"at most {limit} concurrent {what} per token; retry when one ends",
                        {"limit": limit}, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def _refuse_here(self, retry_after: int) -> None:
        """This process answers the token's next requests for such a slot itself until Retry-After."""
        if self.refusals is not None and has_request_context():
            if token_hash := request.environ.get(TOKEN_HASH_KEY):
                self.refusals.refuse(token_hash, retry_after, self.kind)

    def release(self, principal: Principal, slot: str) -> None:
        try:
            self.redis.zrem(self.key(principal), slot)
        except Exception as exc:  # it expires on its own
            log.warning("could not release a %s slot: %s", self.kind, exc)

    @contextlib.contextmanager
    def held(self, principal: Principal, limit: int, hold_seconds: float, what: str):
        slot = self.acquire(principal, limit, hold_seconds, what)
        try:
            yield
        finally:
            self.release(principal, slot)


def slots(kind: str) -> Slots:
    """The app's slots of one kind: "long_poll" or "stream"."""
    return current_app.extensions["nexus_slots"][kind]


def long_poll(principal: Principal, seconds: float, settings: Settings):
    """Hold one of the token's long-poll slots for a `?wait=` request."""
    return slots("long_poll").held(principal, settings.max_long_polls_per_token, seconds, "long-polls (?wait=)")


def check_priority(principal: Principal, priority: int, settings: Settings, index: int | None = None) -> None:
    ceiling = 9 if principal.is_admin else settings.submitter_max_priority
    if priority > ceiling:
        details = {"field": "priority", "max_priority": ceiling, **({"index": index} if index is not None else {})}
        raise ApiError(400, f"priority {priority} is above this token's ceiling {ceiling} "
                            "(NEXUS_SUBMITTER_MAX_PRIORITY; admins may use up to 9)", details)


def install_rate_limit(app: Flask, settings: Settings) -> Limiter | None:
    """Flask-Limiter over Redis, keyed by token; registered after authentication so the token is known."""
    if not settings.rate_limit.strip():
        return None
    limiter = Limiter(
        key_func=_token_key, app=app, storage_uri=settings.redis_url,
        # The process's blocking pool (nexus.services): limits' own would be redis-py's default of 100
        # connections, which raises "Too many connections" when more requests than that hit it at once.
        storage_options={"connection_pool": app.extensions["nexus"].redis.connection_pool},
        # Application limits: one budget per token across every route (default limits count per route).
        application_limits=[settings.rate_limit], application_limits_exempt_when=_exempt,
        # Sliding window counter: a token that keeps flooding gets the limit's rate, spread over the window;
        # a fixed window let it spend a whole minute's budget in the first seconds of every minute.
        strategy="sliding-window-counter",
        # No X-RateLimit headers on every answer: each would cost one more Redis read per request.
        headers_enabled=False, key_prefix="nexus",
        swallow_errors=True,  # Redis down: serve (the routes that need Redis answer 503 themselves)
    )

    app.extensions["nexus_limiter"] = limiter

    @app.errorhandler(RateLimitExceeded)
    def too_many(exc: RateLimitExceeded):
        return error_body(429, f"rate limit exceeded: {exc.description} per token", {"limit": exc.description}), \
            429, rate_limit_headers()

    return limiter


def rate_limit_headers() -> dict:
    """Retry-After for a request the rate limit refused: seconds until the token may send again.

    This process then answers the token's requests itself until that time (nexus.api.refusals)."""
    breached = current_app.extensions["nexus_limiter"].current_limit
    reset_at = breached.reset_at if breached else time.time() + 1
    retry_after = max(1, int(reset_at - time.time()))
    if token_hash := request.environ.get(TOKEN_HASH_KEY):
        current_app.extensions["nexus_refusals"].refuse(token_hash, retry_after)
    return {"Retry-After": str(retry_after)}


def install_refusal_gate(app: Flask) -> RefusalCache:
    """Answer tokens refused for their rate or slots before Flask sees them (nexus.api.refusals)."""
    refusals = app.extensions["nexus_refusals"] = RefusalCache()
    app.wsgi_app = RefusalGate(app.wsgi_app, refusals)  # type: ignore[method-assign]
    return refusals


def _token_key() -> str:
    principal: Principal | None = g.get("principal")
    return str(principal.token_id) if principal else "anonymous"  # anonymous requests are exempt


def _exempt() -> bool:
    """Flask-Limiter's own check skips these requests (the views of SELF_COUNTED_ENDPOINTS count themselves)."""
    return rate_exempt() or request.endpoint in SELF_COUNTED_ENDPOINTS


def rate_exempt() -> bool:
    """Requests the token's rate never counts: anonymous ones, workers', the node routes."""
    principal: Principal | None = g.get("principal")
    return principal is None or principal.role is Role.WORKER or request.blueprint in NODE_BLUEPRINTS
