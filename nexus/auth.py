"""API tokens: generated once, stored only as a SHA-256 hash, each with a role and a tenant.

Roles: `admin` (everything), `submitter` (its own tenant's jobs), `worker`
(what agents and workers need). A token may expire (`expires_at`); an expired
or revoked one is refused.

Kinds: `api` (made through the API), `bootstrap` (NEXUS_ADMIN_TOKEN, stored at
master start; a new value revokes the previous one), `join` (NEXUS_JOIN_TOKEN,
stored at master start, or one rotated in live by `nexus token --rotate-join`).
A join token is good for registering a node and nothing else. Rotating retires
the previous join token (it expires: no new node joins with it, nodes that joined
with it keep working); revoking a join or worker token removes the nodes that
registered with it.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import Connection, Engine, text


class Role(str, Enum):
    ADMIN = "admin"
    SUBMITTER = "submitter"
    WORKER = "worker"


TOKEN_PREFIX = "nx_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from a bearer token on every request."""

    token_id: uuid.UUID
    name: str
    role: Role
    tenant: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


_COLUMNS = "id, name, prefix, role, tenant, kind, created_at, expires_at, revoked_at"
_USABLE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"


def create_token(conn: Connection, name: str, role: Role, tenant: str, token: str | None = None,
                 expires_in_seconds: float | None = None, kind: str = "api") -> tuple[str, dict]:
    """Store a new token; returns the token itself (shown once) and its row (without the secret)."""
    token = token or generate_token()
    row = conn.execute(
        text(f"""INSERT INTO api_tokens (id, name, token_hash, prefix, role, tenant, kind, expires_at)
                 VALUES (:id, :name, :hash, :prefix, :role, :tenant, :kind,
                         now() + make_interval(secs => CAST(:expires AS float8)))
                 RETURNING {_COLUMNS}"""),
        {"id": uuid.uuid4(), "name": name, "hash": hash_token(token), "prefix": token[:8], "role": role.value,
         "tenant": tenant, "kind": kind, "expires": expires_in_seconds},
    ).mappings().one()
    return token, dict(row)


def authenticate(conn: Connection, token: str) -> Principal | None:
    """The principal behind a token, or None if it is unknown, revoked, expired or a join token."""
    row = conn.execute(
        text(f"SELECT id, name, role, tenant FROM api_tokens WHERE token_hash = :h AND kind <> 'join' AND {_USABLE}"),
        {"h": hash_token(token)},
    ).first()
    return None if row is None else Principal(row.id, row.name, Role(row.role), row.tenant)


def authenticate_join(conn: Connection, token: str) -> uuid.UUID | None:
    """The id of a usable join token or worker-role token, locked (FOR SHARE) until the caller commits:
    a revocation running meanwhile waits, then finds the node registered with it and removes it."""
    row = conn.execute(
        text(f"""SELECT id FROM api_tokens WHERE token_hash = :h AND role = 'worker' AND kind IN ('join', 'api')
                 AND {_USABLE} FOR SHARE"""), {"h": hash_token(token)}).first()
    return None if row is None else row.id


def rotate_join_token(conn: Connection) -> tuple[str, dict]:
    """A new join token; the previous ones expire now (nodes that joined with them keep working)."""
    conn.execute(text(f"UPDATE api_tokens SET expires_at = now() WHERE kind = 'join' AND {_USABLE}"))
    return create_token(conn, "join", Role.WORKER, "default", token="nxj_" + secrets.token_urlsafe(32), kind="join")


def revoke_token(conn: Connection, token_id: uuid.UUID) -> bool:
    result = conn.execute(
        text("UPDATE api_tokens SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL"), {"id": token_id}
    )
    return result.rowcount == 1


def list_tokens(conn: Connection) -> list[dict]:
    rows = conn.execute(text(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_at")).mappings()
    return [dict(r) for r in rows]


def ensure_bootstrap_admin(engine: Engine, token: str) -> None:
    """Store the configured admin token once and revoke any earlier one: rotating NEXUS_ADMIN_TOKEN
    and restarting the master is how an operator retires a leaked admin token (idempotent)."""
    with engine.begin() as conn:
        exists = conn.execute(text("SELECT 1 FROM api_tokens WHERE token_hash = :h"), {"h": hash_token(token)}).first()
        if not exists:
            create_token(conn, "bootstrap-admin", Role.ADMIN, "default", token=token, kind="bootstrap")
        conn.execute(text("UPDATE api_tokens SET revoked_at = now() WHERE kind = 'bootstrap' AND token_hash <> :h "
                          "AND revoked_at IS NULL"), {"h": hash_token(token)})


def ensure_bootstrap_join(engine: Engine, token: str) -> None:
    """Store NEXUS_JOIN_TOKEN as a join token when it is new, retiring the join tokens before it.
    A value stored already is left as it is: a restart does not revive a join token rotated out live."""
    with engine.begin() as conn:
        exists = conn.execute(text("SELECT 1 FROM api_tokens WHERE token_hash = :h"), {"h": hash_token(token)}).first()
        if not exists:
            conn.execute(text(f"UPDATE api_tokens SET expires_at = now() WHERE kind = 'join' AND {_USABLE}"))
            create_token(conn, "bootstrap-join", Role.WORKER, "default", token=token, kind="join")
