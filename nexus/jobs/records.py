"""The job as the code passes it around: one frozen record, its fields the one list of columns.

`Job` is what every read of a job returns (nexus.jobs.queries), what a submission
answers with, what the API serialises (field for field, in this order) and what a
client can parse back (`Job.from_json`). Its fields are the columns SELECTed, so
the SQL column list, the API's fields and the record cannot drift apart.

The jobs table has a few more columns: the lifecycle's and reconciler's own
bookkeeping (not_before, published_attempt, published_at, lease_expires_at,
heartbeat_at, failed_nodes). Only their own statements read them, so they are
not part of the record.

Why a frozen dataclass with slots and not a pydantic model: rows come from
PostgreSQL already typed, so there is nothing to validate, and the record is
built on the dispatch path; a slotted dataclass costs one plain __init__ per
row (well under a microsecond), a validating model several times that.
The worker's hot writes (claim, complete, fail) return `Claimed` and `Outcome`:
the few columns they use, named from the same list, because decoding the whole
row there cost ~0.1 ms per statement.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from operator import itemgetter
from datetime import datetime
from typing import Any, Callable, Mapping, TypeVar


@dataclass(frozen=True, slots=True)
class Job:
    id: uuid.UUID
    type: str
    state: str  # a nexus.jobs.states.JobState value, kept as the database's text
    priority: int
    tenant: str
    attempt: int
    max_attempts: int
    requirements: dict[str, Any]
    queue: str
    payload: Any
    input_key: str | None
    idempotency_key: str | None
    parent_id: uuid.UUID | None
    result: Any
    output_key: str | None
    error: str | None
    progress: Any
    node: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> "Job":
        """From a row (or dict) that has at least every column; other keys are ignored."""
        return cls(*[row[name] for name in JOB_COLUMNS])

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Job":
        """From the API's JSON for a job (ids and times come back as strings; extra keys, such as
        output_url, are ignored)."""
        values: dict[str, Any] = {name: data.get(name) for name in JOB_COLUMNS}
        for name in _UUIDS:
            values[name] = uuid.UUID(values[name]) if values[name] is not None else None
        for name in _TIMES:
            values[name] = datetime.fromisoformat(values[name]) if values[name] is not None else None
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The API's JSON shape: every field, in order, ids and times as strings."""
        return {name: jsonable(getattr(self, name)) for name in JOB_COLUMNS}


JOB_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Job))
_UUIDS = ("id", "parent_id")
_TIMES = ("created_at", "started_at", "finished_at", "updated_at")


def select_list(prefix: str = "") -> str:
    """The columns of a `Job`, in order, for a SELECT or RETURNING clause (`prefix` e.g. "j.")."""
    return ", ".join(prefix + name for name in JOB_COLUMNS)


def jsonable(value: Any) -> Any:
    """A column value as JSON: ids and times as strings."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# --- what the worker's own transitions return --------------------------------------------------
# Each transition statement also returns the state it came from and how long the attempt ran.
TRANSITION_EXTRAS = ("from_state", "run_seconds", "lease_token")
CLAIM_EXTRAS = ("refill",)  # the claim's own (nexus.jobs.lifecycle.claim)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed attempt: what the runner needs to start the handler."""

    id: uuid.UUID
    type: str
    state: str
    attempt: int
    tenant: str
    input_key: str | None
    payload: Any
    queue: str = ""
    # The tenant has held jobs on this queue and, with this message taken, room to publish one
    # (nexus.jobs.fairshare): the claiming worker refills at once.
    refill: bool = False
    lease_token: uuid.UUID | None = None  # drawn by the claim; the attempt's later writes show it


@dataclass(frozen=True, slots=True)
class Lease:
    """A running attempt as its worker holds it: every write or read of the attempt names all three."""

    job_id: uuid.UUID
    attempt: int
    token: uuid.UUID | None  # None: the master's own tools, which the attempt fence alone admits


@dataclass(frozen=True, slots=True)
class Outcome:
    """A recorded outcome (succeeded, failed, retrying, cancelled): what the runner and notices use."""

    id: uuid.UUID
    type: str
    state: str
    attempt: int
    node: str | None
    error: str | None
    run_seconds: float | None = None


def returning(record: type) -> str:
    """The RETURNING list for a projection record: its fields that are job columns, as `j.<name>`."""
    names = [f.name for f in fields(record)]
    unknown = set(names) - set(JOB_COLUMNS) - set(TRANSITION_EXTRAS) - set(CLAIM_EXTRAS)
    if unknown:
        raise TypeError(f"{record.__name__} names fields that are not job columns: {sorted(unknown)}")
    return ", ".join(f"j.{name}" for name in names if name in JOB_COLUMNS)


Projection = TypeVar("Projection", Claimed, Outcome)


def project(record: type[Projection], row: Mapping[Any, Any]) -> Projection:
    """Build a projection record from a transition's row (which has its fields and the extras)."""
    return record(*_GETTERS[record](row))


_GETTERS: dict[type, Callable[[Mapping[Any, Any]], tuple[Any, ...]]] = {
    record: itemgetter(*(f.name for f in fields(record))) for record in (Claimed, Outcome)}
