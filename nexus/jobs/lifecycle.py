"""Every write of a job's state, each one conditional SQL statement (docs/ARCHITECTURE.md, "Jobs are rows first").

A transition and its event row are written by the same statement, so the event
log can never disagree with the job. Claims, completions and failures are
guarded by the attempt number (the fencing token): a worker that lost its
lease cannot overwrite a newer attempt.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, TypeVar

from sqlalchemy import Connection, Engine, RowMapping, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import Uuid

from nexus.db.prepared import Prepared
from nexus.jobs import fairshare
from nexus.jobs.failures import FailureKind
from nexus.jobs.records import Claimed, Job, Outcome, project, returning, select_list
from nexus.jobs.states import ACTIVE_STATES, CLAIMABLE_STATES, RETRYABLE_BY_HAND, JobState, sql_in


@dataclass
class JobSpec:
    """A validated submission, ready to insert."""

    type: str
    queue: str
    payload: Any = None
    input_key: str | None = None
    requirements: dict[str, Any] = field(default_factory=dict)
    priority: int = 5
    max_attempts: int = 3
    tenant: str = "default"
    idempotency_key: str | None = None
    parent_id: uuid.UUID | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, never above `cap`."""
    ceiling = min(cap, base * (2.0 ** max(0, attempt - 1)))
    jitter = rng.random() if rng else random.random()
    return ceiling / 2 + jitter * ceiling / 2


# Each new job is published (published_attempt 1) while its tenant's share of the queue has room,
# else held (0) for nexus.jobs.fairshare to publish later, counted in this same statement (the
# /v1 path's one write). New jobs wait behind held ones: room is 0 while the tenant has a held job
# ready, so the refill keeps priority and submission order.
_INSERT_JOBS = Prepared("nexus_insert_jobs", f"""
    WITH input AS (
        SELECT t.*, row_number() OVER (PARTITION BY t.tenant, t.queue ORDER BY t.priority DESC, t.ord) AS rank
        FROM unnest(:ids, :types, :payloads, :input_keys, :requirements, :queues, :priorities, :max_attempts,
                    :tenants, :idem_keys, :parent_ids) WITH ORDINALITY
             AS t(id, type, payload, input_key, requirements, queue, priority, max_attempts, tenant,
                  idempotency_key, parent_id, ord)
    ),
    room AS (
        SELECT pairs.tenant, pairs.queue,
               CASE WHEN :share = 0 THEN NULL
                    WHEN {fairshare.has_ready('h', 'pairs.tenant', 'pairs.queue')} THEN 0
                    ELSE :share - {fairshare.published_count('p', 'pairs.tenant', 'pairs.queue')} END AS n
        FROM (SELECT DISTINCT tenant, queue FROM input) pairs
    ),
    ins AS (
    INSERT INTO jobs (id, type, payload, input_key, requirements, queue, priority, max_attempts, tenant,
                      idempotency_key, parent_id, published_attempt, published_at, created_at)
    SELECT i.id, i.type, i.payload, i.input_key, i.requirements, i.queue, i.priority, i.max_attempts, i.tenant,
           i.idempotency_key, i.parent_id, CASE WHEN r.n IS NULL OR i.rank <= r.n THEN 1 ELSE 0 END,
           CASE WHEN r.n IS NULL OR i.rank <= r.n THEN now() END,
           clock_timestamp()  -- in submission order (volatile: evaluated after the sort), the order held jobs go in
    FROM input i JOIN room r ON r.tenant = i.tenant AND r.queue = i.queue
    ORDER BY i.ord
    ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, created_at, published_attempt
    ),
    ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, message)
        SELECT id, NULL, 'queued', 0, 'submitted' FROM ins
    )
    SELECT id, created_at, published_attempt = 1 AS published FROM ins
    """, {"ids": "uuid[]", "types": "text[]", "payloads": "jsonb[]", "input_keys": "text[]",
          "requirements": "jsonb[]", "queues": "text[]", "priorities": "smallint[]", "max_attempts": "int[]",
          "tenants": "text[]", "idem_keys": "text[]", "parent_ids": "uuid[]", "share": "int"})


@dataclass(frozen=True)
class Inserted:
    """A row a submission inserted: when, and whether its message goes out now (else its tenant's
    share of the queue is full and nexus.jobs.fairshare publishes it later)."""

    created_at: datetime
    published: bool


def insert_jobs(conn: Connection, specs: list[JobSpec], share: int = 0) -> dict[uuid.UUID, Inserted]:
    """Insert rows and their `submitted` events in one statement; returns the rows inserted by id
    (idempotent repeats are not). `share`: Settings.max_broker_messages_per_tenant (0: publish all)."""
    if not specs:
        return {}
    params = {
        "ids": [s.id for s in specs],
        "types": [s.type for s in specs],
        "payloads": [json.dumps(s.payload) for s in specs],
        "input_keys": [s.input_key for s in specs],
        "requirements": [json.dumps(s.requirements) for s in specs],
        "queues": [s.queue for s in specs],
        "priorities": [s.priority for s in specs],
        "max_attempts": [s.max_attempts for s in specs],
        "tenants": [s.tenant for s in specs],
        "idem_keys": [s.idempotency_key for s in specs],
        "parent_ids": [s.parent_id for s in specs],
        "share": share,
    }
    return {row["id"]: Inserted(row["created_at"], row["published"]) for row in _INSERT_JOBS.execute(conn, params)}


def delete_unstarted(conn: Connection, ids: list[uuid.UUID]) -> None:
    """Undo a submission whose messages could not be published (nothing half-written)."""
    conn.execute(
        text(f"DELETE FROM jobs WHERE id = ANY(:ids) AND state = '{JobState.QUEUED.value}' AND attempt = 0").bindparams(
            bindparam("ids", type_=ARRAY(Uuid))
        ),
        {"ids": ids},
    )


def _transition_sql(to_state: str | None, where: str, sets: str, returning: str) -> str:
    """UPDATE one job under `where` and log the event, in one statement.

    `to_state` None keeps the state (the SET clause decides it). The row is
    locked first so concurrent claimers queue up and re-check the guard.
    `returning` names the columns the caller reads (it must include id, state and attempt):
    the worker's writes return only what it uses, the whole row costs ~0.1 ms to decode.
    The UPDATE names `j.id = :id` itself, not only through `old`: otherwise, with stale statistics,
    PostgreSQL found the row by scanning every job in the guarded states (a claim cost O(backlog)).
    """
    state_set = f"state = '{to_state}', " if to_state else ""
    return f"""
    WITH old AS (SELECT id, state FROM jobs WHERE id = :id FOR UPDATE),
    upd AS (
        UPDATE jobs j SET {state_set}updated_at = now(), {sets}
        FROM old WHERE j.id = :id AND j.id = old.id AND {where}
        RETURNING {returning}, old.state AS from_state,
                  EXTRACT(EPOCH FROM (now() - j.started_at)) AS run_seconds
    ),
    ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, node, message, failure_kind)
        SELECT id, from_state, state, attempt, :event_node, :event_message, :event_failure_kind FROM upd
    )
    SELECT * FROM upd
    """


def _one(conn: Connection, statement: str | Prepared, params: dict[str, Any]) -> RowMapping | None:
    params.setdefault("event_node", None)
    params.setdefault("event_message", None)
    params.setdefault("event_failure_kind", None)
    if isinstance(statement, Prepared):
        rows = statement.execute(conn, params)
        return rows[0] if rows else None
    return conn.execute(text(statement), params).mappings().first()


def _outcome(row: Mapping[Any, Any] | None) -> Outcome | None:
    return project(Outcome, row) if row is not None else None


_EVENT_PARAMS = {"event_node": "text", "event_message": "text", "event_failure_kind": "text"}



# The claim commits asynchronously (no WAL flush wait, ~0.35 ms saved per job). Safe because of
# fencing: if PostgreSQL crashed before flushing it, the row reverts to queued, the running attempt's
# lease renewals and completion find no matching row and are discarded, and the reconciler
# re-publishes the job. Submission and completion stay synchronous: clients are told about those.
_CLAIM = Prepared("nexus_claim", _transition_sql(
    JobState.RUNNING.value,
    where=f"""{sql_in("j.state", CLAIMABLE_STATES)} AND j.attempt = :attempt - 1
              AND j.attempt < j.max_attempts AND NOT j.cancel_requested
              AND (j.not_before IS NULL OR j.not_before <= now())""",
    sets="""attempt = j.attempt + 1, node = :node, started_at = now(), heartbeat_at = now(),
            lease_expires_at = now() + make_interval(secs => :lease), error = NULL""",
    # Whether this claim frees a place the tenant's held jobs may take (nexus.jobs.fairshare). The
    # subqueries see the row as it was (still a published message), hence `<=`. Two index probes,
    # both empty for a tenant with nothing held.
    returning=returning(Claimed) + f""", (:share > 0 AND {fairshare.has_ready('h', 'j.tenant', 'j.queue')}
        AND {fairshare.published_count('p', 'j.tenant', 'j.queue')} <= :share) AS refill""",
), {"id": "uuid", "attempt": "int", "node": "text", "lease": "float8", "share": "int", **_EVENT_PARAMS},
    prefix="SET LOCAL synchronous_commit = off; ")


def claim(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str, lease_seconds: float,
          share: int = 0) -> Claimed | None:
    """Take the job for `attempt`, or None: the message is stale or a duplicate and must be dropped.
    `share`: Settings.max_broker_messages_per_tenant, for the answer's `refill`."""
    row = _one(conn, _CLAIM, {"id": job_id, "attempt": attempt, "node": node, "lease": lease_seconds,
                              "share": share, "event_node": node})
    return project(Claimed, row) if row is not None else None


_RENEW = text(
    """UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now()
       FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS a(id, attempt)
       WHERE j.id = a.id AND j.attempt = a.attempt AND j.state = 'running'
       RETURNING j.id, j.cancel_requested"""
).bindparams(bindparam("ids", type_=ARRAY(Uuid)))


def renew_leases(conn: Connection, attempts: dict[uuid.UUID, int], lease_seconds: float) -> dict[uuid.UUID, bool]:
    """Extend the leases of these (job, attempt) pairs in one statement.

    Returns {job id: cancel requested} for the attempts that still own their job;
    a job missing from the answer was taken over by a newer attempt (or finished).
    """
    if not attempts:
        return {}
    rows = conn.execute(_RENEW, {"ids": list(attempts), "attempts": list(attempts.values()), "lease": lease_seconds})
    return {row[0]: bool(row[1]) for row in rows}


_FENCED = f"j.id = :id AND j.attempt = :attempt AND j.state = '{JobState.RUNNING.value}'"
_OUTCOME_COLUMNS = returning(Outcome)  # what the runner and notices use

_COMPLETE = Prepared("nexus_complete", _transition_sql(
    JobState.SUCCEEDED.value,
    where=_FENCED,
    sets="result = :result, output_key = :output_key, finished_at = now(), lease_expires_at = NULL",
    returning=_OUTCOME_COLUMNS,
), {"id": "uuid", "attempt": "int", "result": "jsonb", "output_key": "text", **_EVENT_PARAMS})


def complete(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str, result: Any,
             output_key: str | None) -> Outcome | None:
    """Record success once; None if this attempt was fenced off (a newer attempt owns the job)."""
    return _outcome(_one(
        conn,
        _COMPLETE,
        {"id": job_id, "attempt": attempt, "result": _json(result), "output_key": output_key, "event_node": node},
    ))


_FAIL = Prepared("nexus_fail", _transition_sql(
    None,
    where=_FENCED,
    sets="""state = CASE WHEN :retry AND j.attempt < j.max_attempts AND NOT j.cancel_requested
                         THEN 'retrying' ELSE 'failed' END,
            error = :error, lease_expires_at = NULL,
            not_before = now() + make_interval(secs => :backoff),
            failed_nodes = array_append(j.failed_nodes, :node),
            finished_at = CASE WHEN :retry AND j.attempt < j.max_attempts AND NOT j.cancel_requested
                               THEN NULL ELSE now() END""",
    returning=_OUTCOME_COLUMNS,
), {"id": "uuid", "attempt": "int", "node": "text", "error": "text", "retry": "boolean", "backoff": "float8",
    **_EVENT_PARAMS})


def fail(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str, error: str, retry: bool, backoff: float,
         kind: FailureKind = FailureKind.JOB) -> Outcome | None:
    """Record a failed attempt: `retrying` after `backoff` while attempts remain, else `failed`.

    `kind` goes on the event: only an infrastructure failure counts against `node` (nexus.jobs.failures).
    """
    return _outcome(_one(
        conn,
        _FAIL,
        {"id": job_id, "attempt": attempt, "node": node, "error": error[:8000], "retry": retry,
         "backoff": backoff, "event_node": node, "event_message": error[:500],
         "event_failure_kind": FailureKind(kind).value},
    ))


_CANCEL_RUNNING = Prepared("nexus_cancel_running", _transition_sql(
    JobState.CANCELLED.value, where=_FENCED, sets="finished_at = now(), lease_expires_at = NULL",
    returning=_OUTCOME_COLUMNS,
), {"id": "uuid", "attempt": "int", **_EVENT_PARAMS})


def mark_cancelled(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str) -> Outcome | None:
    """A running attempt saw the cancel flag and stopped."""
    return _outcome(_one(conn, _CANCEL_RUNNING, {"id": job_id, "attempt": attempt, "event_node": node,
                                                 "event_message": "cancelled while running"}))


_CANCEL_WAITING = _transition_sql(
    JobState.CANCELLED.value,
    where=sql_in("j.state", CLAIMABLE_STATES),  # waiting: no attempt runs, so it ends at once
    sets="finished_at = now(), cancel_requested = true",
    returning="j.id, j.state, j.attempt",  # nobody reads it
)
_REQUEST_CANCEL = text(
    f"UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = :id AND state = '{JobState.RUNNING.value}'"
)
_ACTIVE_CHILDREN = text(f"SELECT id FROM jobs WHERE parent_id = :id AND {sql_in('state', ACTIVE_STATES)}")


def request_cancel(conn: Connection, job_id: uuid.UUID | str, by: str | None = None) -> None:
    """Cancel at once if waiting; otherwise raise the flag the running attempt checks. Children follow."""
    _one(conn, _CANCEL_WAITING, {"id": job_id, "event_message": f"cancelled by {by or 'request'}"})
    conn.execute(_REQUEST_CANCEL, {"id": job_id})
    for (child_id,) in conn.execute(_ACTIVE_CHILDREN, {"id": job_id}).all():
        request_cancel(conn, child_id, by=f"parent {job_id}")


_MANUAL_RETRY = _transition_sql(
    JobState.RETRYING.value,
    where=sql_in("j.state", RETRYABLE_BY_HAND),
    sets="""max_attempts = GREATEST(j.max_attempts, j.attempt + 1), cancel_requested = false,
            not_before = now(), finished_at = NULL, published_attempt = j.attempt, error = NULL""",
    returning=select_list("j."),
)


def manual_retry(conn: Connection, job_id: uuid.UUID | str, by: str | None = None) -> Job | None:
    """Give a failed or cancelled job one more attempt (the job as it now is); the reconciler publishes it."""
    row = _one(conn, _MANUAL_RETRY, {"id": job_id, "event_message": f"retry requested by {by or 'request'}"})
    return Job.from_mapping(row) if row is not None else None


def set_progress(conn: Connection, job_id: uuid.UUID | str, attempt: int, progress: dict[str, Any]) -> None:
    conn.execute(
        text("UPDATE jobs SET progress = :p WHERE id = :id AND attempt = :attempt "
             f"AND state = '{JobState.RUNNING.value}'").bindparams(bindparam("p", type_=JSONB)),
        {"id": job_id, "attempt": attempt, "p": progress},
    )


def _json(value: Any) -> str | None:
    """Bind a Python value to a JSONB parameter (None stays SQL NULL)."""
    return None if value is None else json.dumps(value)


Result = TypeVar("Result")


def run_in_transaction(engine: Engine, fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    with engine.begin() as conn:
        return fn(conn, *args, **kwargs)
