"""Refusing an over-limit token cheaply: before Flask, authentication and Redis see the request.

A token the shared rate limit (Flask-Limiter on Redis, nexus.api.limits) refused is told
`Retry-After: N`. A well-behaved client waits N seconds; a hostile one retries at once, in a loop,
from many connections. Each such retry used to cost a full Flask request: routing, the token's
authentication (a database lookup whenever the token cache had expired), the rate limit's Redis
round trips, the per-token slot's Lua script; a tenant spinning on 429s took the API process's CPU
from every other tenant (bench/fairness.py: the well-behaved tenant's p50 went from 12 ms to 525 ms).

So each API process remembers, by the token's hash, until when it told a token to come back (for
its rate, or because it held all its long-poll or stream slots: then only such requests), and
answers that token's requests before then itself, at the WSGI layer: one SHA-256 and one dict
lookup, the same 429 and the same Retry-After, nothing else. The remembered time is the one the
client was given, so no request that the shared limit would have admitted is refused after the
client waited as told. Under gevent the answer is also delayed by up to a second (as nginx's
limit_req delays excess requests): a greenlet that sleeps costs no CPU, and a client that ignores
Retry-After then waits anyway, instead of turning each connection into a loop of refusals. At most
`max_delayed` answers are delayed at once per process; beyond that they go out at once, so delayed
refusals cannot hold every connection the process may open.

Never refused here: requests without a token (health), the node routes (heartbeats, like the
shared limit's exemption) — and tokens the shared limit never refused, which is every worker token.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from typing import Any, Callable, Iterable

from nexus.api.errors import error_body
from nexus.auth import hash_token
from nexus.inference.openai_shapes import OpenAIError

TOKEN_HASH_KEY = "nexus.token_hash"  # the environ key where the gate leaves the hash for authentication
MAX_DELAY_SECONDS = 1.0
# Paths the shared limit never counts (its NODE_BLUEPRINTS): the gate leaves them alone as well.
EXEMPT_PREFIXES = ("/healthz", "/api/v1/nodes", "/api/v1/gpu", "/api/v1/cluster")

# What a token was refused for. A refused rate refuses all its requests; full slots only the requests
# that would take one, recognised by path because the gate runs before routing: `?wait=` on the job
# routes (nexus.api.jobs) takes a long-poll slot, a POST to a /v1 completion route a stream slot.
RATE, LONG_POLL, STREAM = "rate", "long_poll", "stream"
STREAM_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_WAIT = re.compile(r"(?:^|&)wait=([^&]*)")
_MESSAGES = {RATE: "rate limit exceeded for this token",
             LONG_POLL: "this token holds all its concurrent long-polls (?wait=)",
             STREAM: "this token holds all its concurrent /v1 completions"}


def kinds_of(environ: dict[str, Any]) -> tuple[str, ...]:
    path = environ.get("PATH_INFO", "")
    if path.startswith("/api/v1/jobs") and (wait := _WAIT.search(environ.get("QUERY_STRING", ""))):
        try:
            if float(wait.group(1)) > 0:
                return RATE, LONG_POLL
        except ValueError:  # the route answers 400 for it
            pass
    if path in STREAM_PATHS and environ.get("REQUEST_METHOD") == "POST":
        return RATE, STREAM
    return (RATE,)


class RefusalCache:
    """(token hash, kind) -> until when (time.monotonic) this process told the token to come back."""

    MAX_ENTRIES = 10_000  # past this, start over rather than grow without bound

    def __init__(self) -> None:
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def refuse(self, token_hash: str, retry_after: int, kind: str = RATE) -> None:
        with self._lock:
            if len(self._until) >= self.MAX_ENTRIES:
                self._until.clear()
            self._until[(token_hash, kind)] = time.monotonic() + retry_after

    def seconds_left(self, token_hash: str, kind: str = RATE) -> float:
        key = (token_hash, kind)
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            with self._lock:
                if self._until.get(key) == until:
                    del self._until[key]
            return 0.0
        return left


def bearer_of(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class RefusalGate:
    """WSGI middleware in front of the Flask app: answers a refused token's requests itself."""

    def __init__(self, app: Callable[..., Iterable[bytes]], refusals: RefusalCache, max_delayed: int = 0):
        self.app = app
        self.refusals = refusals
        self.max_delayed = max_delayed  # 0: answer at once (threaded servers: a sleep would hold a thread)
        self._delayed = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        token = bearer_of(environ.get("HTTP_AUTHORIZATION", ""))
        if token is not None:
            token_hash = environ[TOKEN_HASH_KEY] = hash_token(token)
            path = environ.get("PATH_INFO", "")
            if not path.startswith(EXEMPT_PREFIXES):
                for kind in kinds_of(environ):
                    if left := self.refusals.seconds_left(token_hash, kind):
                        return self._refuse(path, kind, left, start_response)
        return self.app(environ, start_response)

    def _refuse(self, path: str, kind: str, left: float, start_response: Callable[..., Any]) -> list[bytes]:
        slept = 0.0
        if self._delayed < self.max_delayed:
            self._delayed += 1
            slept = min(left, MAX_DELAY_SECONDS)
            try:
                time.sleep(slept)
            finally:
                self._delayed -= 1
        retry_after = max(1, math.ceil(left - slept))
        message = f"{_MESSAGES[kind]}; retry after the Retry-After seconds"
        if path.startswith("/v1/"):
            body = OpenAIError(message, status=429, type="rate_limit_error", code="rate_limit_exceeded").body()
        else:
            body = error_body(429, message, {"retry_after": retry_after, "refused_for": kind})
        return too_many_requests(start_response, body, retry_after)


def too_many_requests(start_response: Callable[..., Any], body: dict, retry_after: int) -> list[bytes]:
    """A 429 answered at the WSGI layer, before Flask: the JSON body and its Retry-After."""
    data = json.dumps(body).encode()
    start_response("429 TOO MANY REQUESTS", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(data))),
                                             ("Retry-After", str(retry_after))])
    return [data]
