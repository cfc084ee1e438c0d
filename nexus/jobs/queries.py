"""Every read of jobs as `Job` records: one, a filtered page, by idempotency key, a parent's children.

Each SELECTs exactly the record's columns (records.select_list), in its order, so a
row becomes a Job positionally, without a dict in between.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import Connection, Engine, text

from nexus.db.functions import DefinerFunction
from nexus.jobs.lifecycle import holds_lease
from nexus.jobs.records import JOB_COLUMNS, Job, Lease, select_list

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
    return {job.idempotency_key: job for job in (Job(*row) for row in rows) if job.idempotency_key is not None}


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


# --- what a running attempt may read, under its lease (the worker role reads nothing else) -------------
_JOB_RETURNS = {name: f"jobs.{name}%TYPE" for name in JOB_COLUMNS}
_LEASE_PARAMS = {"id": "uuid", "attempt": "int", "lease_token": "uuid"}
_OWN_JOB = DefinerFunction("nexus_w_own_job", _LEASE_PARAMS, _JOB_RETURNS,
                           f"SELECT {select_list('j.')} FROM jobs j WHERE {holds_lease('j')}")
_PARENT = DefinerFunction("nexus_w_parent_job", _LEASE_PARAMS, _JOB_RETURNS,
                          f"SELECT {select_list('p.')} FROM jobs j JOIN jobs p ON p.id = j.parent_id "
                          f"WHERE {holds_lease('j')}")
# With each child: whether its backoff is over and the nodes it failed on (a waiting parent helps with it).
_CHILDREN_RETURNS = {**_JOB_RETURNS, "due": "boolean", "failed_nodes": "jobs.failed_nodes%TYPE"}
_OWN_CHILDREN = DefinerFunction(
    "nexus_w_children", _LEASE_PARAMS, _CHILDREN_RETURNS,
    f"""SELECT {select_list('c.')}, coalesce(c.not_before <= now(), true), c.failed_nodes
        FROM jobs j JOIN jobs c ON c.parent_id = j.id WHERE {holds_lease('j')} ORDER BY c.created_at, c.id""")
_COUNT_OWN_CHILDREN = DefinerFunction(
    "nexus_w_count_children", {**_LEASE_PARAMS, "keys": "text[]"}, {"n": "bigint"},
    f"""SELECT count(*) FROM jobs j JOIN jobs c ON c.parent_id = j.id WHERE {holds_lease('j')}
        AND (c.idempotency_key IS NULL OR NOT c.idempotency_key = ANY(:keys))""")


@dataclass(frozen=True)
class ChildStatus:
    """A child as its running parent sees it: the job, whether it may run now, where it failed."""

    job: Job
    due: bool
    failed_nodes: list[str]


def _lease_values(lease: Lease) -> dict[str, Any]:
    return {"id": lease.job_id, "attempt": lease.attempt, "lease_token": lease.token}


def own_job(conn: Connection, lease: Lease) -> Job | None:
    """The running attempt's own row; None once the attempt lost its lease."""
    rows = _OWN_JOB.execute(conn, _lease_values(lease))
    return Job.from_mapping(rows[0]) if rows else None


def parent_job(conn: Connection, lease: Lease) -> Job | None:
    """The parent of the running attempt's job (a verification reads the proof it checks)."""
    rows = _PARENT.execute(conn, _lease_values(lease))
    return Job.from_mapping(rows[0]) if rows else None


def own_children(conn: Connection, lease: Lease) -> list[ChildStatus]:
    """The running attempt's children, oldest first."""
    return [ChildStatus(Job.from_mapping(row), bool(row["due"]), list(row["failed_nodes"] or ()))
            for row in _OWN_CHILDREN.execute(conn, _lease_values(lease))]


def count_own_children_besides(conn: Connection, lease: Lease, keys: Iterable[str]) -> int:
    """The running attempt's children, leaving out those with these idempotency keys (a retried parent's)."""
    rows = _COUNT_OWN_CHILDREN.execute(conn, {**_lease_values(lease), "keys": list(keys)})
    return int(rows[0]["n"])


WORKER_READS = (_OWN_JOB, _PARENT, _OWN_CHILDREN, _COUNT_OWN_CHILDREN)


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
    clauses: list[str] = ["TRUE"]
    params: dict[str, Any] = {"limit": limit + 1}
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
