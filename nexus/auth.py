"""API tokens: generated once, stored only as a SHA-256 hash, each with a role and a tenant.

Roles: `admin` (everything), `submitter` (its own tenant's jobs), `worker`
(what agents and workers need). The bootstrap admin token from Settings is
stored the same way when the master starts.
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


def create_token(conn: Connection, name: str, role: Role, tenant: str, token: str | None = None) -> tuple[str, dict]:
    """Store a new token; returns the token itself (shown once) and its row (without the secret)."""
    token = token or generate_token()
    row = conn.execute(
        text("""INSERT INTO api_tokens (id, name, token_hash, prefix, role, tenant)
                VALUES (:id, :name, :hash, :prefix, :role, :tenant)
                RETURNING id, name, prefix, role, tenant, created_at, revoked_at"""),
        {"id": uuid.uuid4(), "name": name, "hash": hash_token(token), "prefix": token[:8], "role": role.value,
         "tenant": tenant},
    ).mappings().one()
    return token, dict(row)


def authenticate(conn: Connection, token: str) -> Principal | None:
    """The principal behind a token, or None if it is unknown or revoked."""
    row = conn.execute(
        text("SELECT id, name, role, tenant FROM api_tokens WHERE token_hash = :h AND revoked_at IS NULL"),
        {"h": hash_token(token)},
    ).first()
    return None if row is None else Principal(row.id, row.name, Role(row.role), row.tenant)


def revoke_token(conn: Connection, token_id: uuid.UUID) -> bool:
    result = conn.execute(
        text("UPDATE api_tokens SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL"), {"id": token_id}
    )
    return result.rowcount == 1


def list_tokens(conn: Connection) -> list[dict]:
    rows = conn.execute(
        text("SELECT id, name, prefix, role, tenant, created_at, revoked_at FROM api_tokens ORDER BY created_at")
    ).mappings()
    return [dict(r) for r in rows]


def ensure_bootstrap_admin(engine: Engine, token: str) -> None:
    """Store the configured admin token once (idempotent; safe with several masters starting)."""
    with engine.begin() as conn:
        exists = conn.execute(text("SELECT 1 FROM api_tokens WHERE token_hash = :h"), {"h": hash_token(token)}).first()
        if not exists:
            create_token(conn, "bootstrap-admin", Role.ADMIN, "default", token=token)
