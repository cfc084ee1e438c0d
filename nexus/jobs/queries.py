"""Every read of jobs as `Job` records: one, a filtered page, by idempotency key, a parent's children.

Each SELECTs exactly the record's columns (records.select_list), in its order, so a
row becomes a Job positionally, without a dict in between.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from sqlalchemy import Connection, Engine, text

from nexus.jobs.records import Job, select_list

_COLUMNS = select_list()
_GET = text(f"SELECT {_COLUMNS} FROM jobs WHERE id = :id")
_BY_IDEMPOTENCY = text(f"SELECT {_COLUMNS} FROM jobs WHERE tenant = :tenant AND idempotency_key = ANY(:keys)")
_CHILDREN = text(f"SELECT {_COLUMNS} FROM jobs WHERE parent_id = :id ORDER BY created_at, id")


def get(conn: Connection, job_id: uuid.UUID | str) -> Job | None:
    row = conn.execute(_GET, {"id": job_id}).first()
    return Job(*row) if row is not None else None


def get_job(engine: Engine, job_id: uuid.UUID | str) -> Job | None:
    """`get` on a connection of its own."""
    with engine.connect() as conn:
        return get(conn, job_id)


def find_by_idempotency(conn: Connection, tenant: str, keys: Iterable[str]) -> dict[str, Job]:
    """The tenant's jobs with these idempotency keys, by key."""
    rows = conn.execute(_BY_IDEMPOTENCY, {"tenant": tenant, "keys": list(keys)})
    return {job.idempotency_key: job for job in (Job(*row) for row in rows)}


def children(conn: Connection, parent_id: uuid.UUID) -> list[Job]:
    """A parent's child jobs, oldest first."""
    return [Job(*row) for row in conn.execute(_CHILDREN, {"id": parent_id})]


def count_children_besides(conn: Connection, parent_id: uuid.UUID, keys: Iterable[str]) -> int:
    """A parent's children, leaving out those with these idempotency keys (a retried parent's repeats)."""
    count: int = conn.execute(
        text("SELECT count(*) FROM jobs WHERE parent_id = :id "
             "AND (idempotency_key IS NULL OR NOT idempotency_key = ANY(:keys))"),
        {"id": parent_id, "keys": list(keys)},
    ).scalar_one()
    return count


@dataclass(frozen=True)
class JobFilter:
    """What a listing is narrowed to; None means any."""

    tenant: str | None = None
    state: str | None = None
    type: str | None = None
    parent_id: uuid.UUID | None = None
    before: tuple[datetime, uuid.UUID] | None = None  # the cursor: (created_at, id) of the last job seen


def list_jobs(conn: Connection, where: JobFilter, limit: int) -> tuple[list[Job], bool]:
    """Newest first, at most `limit`; and whether more follow."""
    clauses, params = ["TRUE"], {"limit": limit + 1}
    for column in ("tenant", "state", "type", "parent_id"):
        value = getattr(where, column)
        if value:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if where.before:
        params["c_at"], params["c_id"] = where.before
        clauses.append("(created_at, id) < (:c_at, :c_id)")
    sql = f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(clauses)} ORDER BY created_at DESC, id DESC LIMIT :limit"
    jobs = [Job(*row) for row in conn.execute(text(sql), params)]
    return jobs[:limit], len(jobs) > limit
