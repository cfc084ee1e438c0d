"""Bearer tokens on every route but health: resolve the caller once per request, check roles per view."""

from __future__ import annotations

import functools
import threading
import time
import uuid

from flask import current_app, g, request

from nexus.api.errors import ApiError
from nexus.api.refusals import TOKEN_HASH_KEY
from nexus.auth import Principal, Role, authenticate, hash_token
from nexus.services import Services

# Endpoints anyone may call: health for load balancers, the API description for humans.
PUBLIC_ENDPOINTS = frozenset({"health.healthz", "openapi.spec", "openapi.docs", "openapi.redoc", "static"})


def services() -> Services:
    services: Services = current_app.extensions["nexus"]
    return services


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate_request() -> None:
    """before_request: every non-public route needs a valid, unrevoked token."""
    if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS or \
            current_app.view_functions.get(request.endpoint, None) in _public_views:
        return
    token = bearer_token()
    if token is None:
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": 'Bearer realm="nexus"'})
    principal = _resolve(token)
    if principal is None:
        raise ApiError(401, "invalid, expired or revoked token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    g.principal = principal
    # The role check of `require`, done here as well: before the body is validated, so a caller
    # without the role learns nothing about the route's input (403, never a 400 listing the fields).
    roles = getattr(current_app.view_functions.get(request.endpoint), "nexus_roles", None)
    if roles is not None and principal.role not in roles:
        raise ApiError(403, _needs(roles))


class TokenCache:
    """Tokens this process resolved in the last `ttl` seconds, by their hash: the API on gevent opens
    thousands of requests at once, and one auth query each queued them all on the database pool
    (2,000 idle streams: most waited 30 s for one of its 30 connections and got 503). Only valid
    tokens are kept; an unknown one is looked up every time."""

    MAX_ENTRIES = 10_000  # past this, start over rather than grow without bound

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lookups: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(token_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, token_hash: str, principal: Principal) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + self.ttl, principal)

    def lookup_lock(self, token_hash: str) -> threading.Lock:
        """The lock that lets one request look this token up while the others of a crowd wait for it."""
        with self._lock:
            if len(self._lookups) >= self.MAX_ENTRIES:
                self._lookups.clear()
            return self._lookups.setdefault(token_hash, threading.Lock())

    def forget(self, token_id: uuid.UUID) -> None:
        """A token revoked through this process: refused here from now on, not after the TTL."""
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e[1].token_id != token_id}


def token_cache() -> TokenCache:
    return current_app.extensions["nexus_token_cache"]


def _resolve(token: str) -> Principal | None:
    cache = token_cache()
    token_hash = request.environ.get(TOKEN_HASH_KEY) or hash_token(token)  # the refusal gate hashed it already
    principal = cache.get(token_hash)
    if principal is not None:
        return principal
    if cache.ttl <= 0:  # no cache: nothing for a crowd to wait for
        with services().statements.connect() as conn:
            return authenticate(conn, token)
    with cache.lookup_lock(token_hash):  # one lookup per token at a time: a crowd arriving at once waits for it
        principal = cache.get(token_hash)
        if principal is None:
            with services().statements.connect() as conn:
                principal = authenticate(conn, token)
            if principal is not None:
                cache.put(token_hash, principal)
    return principal


_public_views: set = set()


def public(view):
    """Mark a view as needing no token (the agent's register call authenticates with the join token itself)."""
    _public_views.add(view)
    return view


def caller() -> Principal:
    return g.principal


def require(*roles: Role):
    """Allow only these roles (admin is always allowed)."""
    allowed = {Role.ADMIN, *roles}

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if caller().role not in allowed:
                raise ApiError(403, _needs(allowed))
            return view(*args, **kwargs)

        wrapper.nexus_roles = frozenset(allowed)  # copied onto outer wrappers by functools.wraps
        return wrapper

    return decorate


def _needs(roles) -> str:
    return f"this route needs the role {' or '.join(sorted(r.value for r in roles))}"
