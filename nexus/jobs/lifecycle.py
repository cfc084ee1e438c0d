"""Every write of a job's state, each one conditional SQL statement (docs/ARCHITECTURE.md, "Jobs are rows first").

A transition and its event row are written by the same statement, so the event
log can never disagree with the job. Claims, completions and failures are
guarded by the attempt number (the fencing token): a worker that lost its
lease cannot overwrite a newer attempt. A running job's writes about its children
(submit, withdraw, retry, cancel) are nexus.jobs.children's, which builds on this module.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, TypeVar

from sqlalchemy import Connection, Engine, RowMapping, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Uuid

from nexus.db.functions import WORKER_ROLE_MARK, DefinerFunction
from nexus.db.prepared import Prepared
from nexus.jobs import fairshare
from nexus.jobs.failures import FailureKind
from nexus.jobs.records import Claimed, Job, Outcome, project, returning, select_list
from nexus.queueing.routing import MASTER_QUEUE_PREFIX
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


def lease_fence(alias: str, token: str = ":lease_token") -> str:
    """The attempt's lease: the worker role must show the token its claim returned; another
    session (the master's own tools, tests) may leave it NULL and rely on the attempt fence alone."""
    return (f"({alias}.lease_token = {token} OR ({token} IS NULL AND session_user <> '{WORKER_ROLE_MARK}'))")


def holds_lease(alias: str, id_param: str = ":id", attempt_param: str = ":attempt") -> str:
    """`alias` is the running attempt whose lease the caller holds."""
    return (f"{alias}.id = {id_param} AND {alias}.attempt = {attempt_param} "
            f"AND {alias}.state = '{JobState.RUNNING.value}' AND {lease_fence(alias)}")


def transition_returns(names: list[str]) -> dict[str, str]:
    """A transition function's output columns: these job columns, then the extras every transition returns."""
    extras = {"lease_token": "uuid", "refill": "boolean", "from_state": "jobs.state%TYPE", "run_seconds": "float8"}
    out = {name: extras.get(name, f"jobs.{name}%TYPE") for name in names}
    return {**out, "from_state": extras["from_state"], "run_seconds": extras["run_seconds"]}


def _fields(record: type) -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(record)]


# Each new job is published (published_attempt 1) while its tenant's share of the queue has room,
# else held (0) for nexus.jobs.fairshare to publish later, counted in this same statement (the
# /v1 path's one write). New jobs wait behind held ones: room is 0 while the tenant has a held job
# ready, so the refill keeps priority and submission order.
_INSERT_JOBS_SQL = f"""
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
    """
_INSERT_JOBS_PARAMS = {
    "ids": "uuid[]", "types": "text[]", "payloads": "jsonb[]", "input_keys": "text[]", "requirements": "jsonb[]",
    "queues": "text[]", "priorities": "smallint[]", "max_attempts": "int[]", "tenants": "text[]",
    "idem_keys": "text[]", "parent_ids": "uuid[]", "share": "int"}

# PostgreSQL switches a prepared statement to a generic plan after five runs, and the one it picked
# after the API's single submissions took 52 s for a bulk of 10,000 (2.7 s planned for it): so a
# large batch is planned for its own size each time; a small one (the token path's) keeps the cached plan.
_INSERT_JOBS = Prepared("nexus_insert_jobs", _INSERT_JOBS_SQL, _INSERT_JOBS_PARAMS)
_INSERT_MANY_JOBS = Prepared("nexus_insert_many_jobs", _INSERT_JOBS_SQL, _INSERT_JOBS_PARAMS,
                             prefix="SET LOCAL plan_cache_mode = force_custom_plan; ")
LARGE_BATCH = 64


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
    statement = _INSERT_MANY_JOBS if len(specs) > LARGE_BATCH else _INSERT_JOBS
    return {row["id"]: Inserted(row["created_at"], row["published"]) for row in statement.execute(conn, params)}


def delete_unstarted(conn: Connection, ids: list[uuid.UUID]) -> None:
    """Undo a submission whose messages could not be published (nothing half-written)."""
    conn.execute(
        text(f"DELETE FROM jobs WHERE id = ANY(:ids) AND state = '{JobState.QUEUED.value}' AND attempt = 0").bindparams(
            bindparam("ids", type_=ARRAY(Uuid))
        ),
        {"ids": ids},
    )


def transition_sql(to_state: str | None, where: str, sets: str, returning: str) -> str:
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
                  EXTRACT(EPOCH FROM (now() - j.started_at))::float8 AS run_seconds
    ),
    ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, node, message, failure_kind)
        SELECT id, from_state, state, attempt, :event_node, :event_message, :event_failure_kind FROM upd
    )
    SELECT * FROM upd
    """


def run_transition(conn: Connection, statement: str | Prepared | DefinerFunction,
                   params: dict[str, Any]) -> RowMapping | None:
    """Run a statement of transition_sql (the event columns default to NULL): the row it wrote, or None."""
    params.setdefault("event_node", None)
    params.setdefault("event_message", None)
    params.setdefault("event_failure_kind", None)
    if isinstance(statement, (Prepared, DefinerFunction)):
        rows = statement.execute(conn, params)
        return rows[0] if rows else None
    return conn.execute(text(statement), params).mappings().first()


def _outcome(row: Mapping[Any, Any] | None) -> Outcome | None:
    return project(Outcome, row) if row is not None else None


EVENT_PARAMS = {"event_node": "text", "event_message": "text", "event_failure_kind": "text"}


# The claim commits asynchronously (no WAL flush wait, ~0.35 ms saved per job). Safe because of
# fencing: if PostgreSQL crashed before flushing it, the row reverts to queued, the running attempt's
# lease renewals and completion find no matching row and are discarded, and the reconciler
# re-publishes the job. Submission and completion stay synchronous: clients are told about those.
# The claim draws the attempt's lease token: only the claimer learns it, and every later write
# of the attempt (renewal, progress, children, outcome) must show it. The worker role may not claim
# a job of the master's queues (a proof's verification: nexus.jobs.registry.JobType.runs_on_master).
CLAIM = DefinerFunction("nexus_w_claim", {"id": "uuid", "attempt": "int", "node": "text", "lease": "float8",
                                          "share": "int", **EVENT_PARAMS},
                        transition_returns(_fields(Claimed)), transition_sql(
    JobState.RUNNING.value,
    where=f"""{sql_in("j.state", CLAIMABLE_STATES)} AND j.attempt = :attempt - 1
              AND j.attempt < j.max_attempts AND NOT j.cancel_requested
              AND (j.not_before IS NULL OR j.not_before <= now())
              AND (j.queue NOT LIKE '{MASTER_QUEUE_PREFIX}%' OR session_user <> '{WORKER_ROLE_MARK}')""",
    sets="""attempt = j.attempt + 1, node = :node, started_at = now(), heartbeat_at = now(),
            lease_expires_at = now() + make_interval(secs => :lease), error = NULL,
            lease_token = gen_random_uuid()""",
    # Whether this claim frees a place the tenant's held jobs may take (nexus.jobs.fairshare). The
    # subqueries see the row as it was (still a published message), hence `<=`. Two index probes,
    # both empty for a tenant with nothing held.
    # The columns in Claimed's order (the function's output is declared from it): ..., queue, refill, lease_token.
    returning=returning(Claimed) + f""", (:share > 0 AND {fairshare.has_ready('h', 'j.tenant', 'j.queue')}
        AND {fairshare.published_count('p', 'j.tenant', 'j.queue')} <= :share) AS refill, j.lease_token""",
), prefix="SET LOCAL synchronous_commit = off; ")


def claim(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str, lease_seconds: float,
          share: int = 0) -> Claimed | None:
    """Take the job for `attempt`, or None: the message is stale or a duplicate and must be dropped.
    `share`: Settings.max_broker_messages_per_tenant, for the answer's `refill`."""
    row = run_transition(conn, CLAIM, {"id": job_id, "attempt": attempt, "node": node, "lease": lease_seconds,
                                       "share": share, "event_node": node})
    return project(Claimed, row) if row is not None else None


RENEW = DefinerFunction(
    "nexus_w_renew", {"ids": "uuid[]", "attempts": "int[]", "tokens": "uuid[]", "lease": "float8"},
    {"id": "jobs.id%TYPE", "cancel_requested": "jobs.cancel_requested%TYPE"},
    f"""UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now()
       FROM unnest(:ids, :attempts, :tokens) AS a(id, attempt, token)
       WHERE j.id = a.id AND j.attempt = a.attempt AND j.state = 'running' AND {lease_fence("j", "a.token")}
       RETURNING j.id, j.cancel_requested""")


def renew_leases(conn: Connection, attempts: dict[uuid.UUID, int], lease_seconds: float,
                 tokens: Mapping[uuid.UUID, uuid.UUID | None] | None = None) -> dict[uuid.UUID, bool]:
    """Extend the leases of these (job, attempt) pairs in one statement; `tokens`: each claim's lease token.

    Returns {job id: cancel requested} for the attempts that still own their job;
    a job missing from the answer was taken over by a newer attempt (or finished).
    """
    if not attempts:
        return {}
    tokens = tokens or {}
    rows = RENEW.execute(conn, {"ids": list(attempts), "attempts": list(attempts.values()),
                                "tokens": [tokens.get(job_id) for job_id in attempts], "lease": lease_seconds})
    return {row["id"]: bool(row["cancel_requested"]) for row in rows}


_FENCED = holds_lease("j")
_OUTCOME_COLUMNS = returning(Outcome)  # what the runner and notices use

_OUTCOME_RETURNS = transition_returns(_fields(Outcome)[:-1])  # run_seconds comes with every transition
_COMPLETE = DefinerFunction("nexus_w_complete", {"id": "uuid", "attempt": "int", "lease_token": "uuid",
                                                 "result": "jsonb", "output_key": "text", **EVENT_PARAMS},
                            _OUTCOME_RETURNS, transition_sql(
    JobState.SUCCEEDED.value,
    where=_FENCED,
    sets="result = :result, output_key = :output_key, finished_at = now(), lease_expires_at = NULL",
    returning=_OUTCOME_COLUMNS,
))


def complete(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str, result: Any,
             output_key: str | None, lease_token: uuid.UUID | None = None) -> Outcome | None:
    """Record success once; None if this attempt was fenced off (a newer attempt owns the job)."""
    return _outcome(run_transition(
        conn,
        _COMPLETE,
        {"id": job_id, "attempt": attempt, "lease_token": lease_token, "result": _json(result),
         "output_key": output_key, "event_node": node},
    ))


_FAIL = DefinerFunction("nexus_w_fail", {"id": "uuid", "attempt": "int", "lease_token": "uuid", "node": "text",
                                         "error": "text", "retry": "boolean", "backoff": "float8", **EVENT_PARAMS},
                         _OUTCOME_RETURNS, transition_sql(
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
))


def fail(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str, error: str, retry: bool, backoff: float,
         kind: FailureKind = FailureKind.JOB, lease_token: uuid.UUID | None = None) -> Outcome | None:
    """Record a failed attempt: `retrying` after `backoff` while attempts remain, else `failed`.

    `kind` goes on the event: only an infrastructure failure counts against `node` (nexus.jobs.failures).
    """
    return _outcome(run_transition(
        conn,
        _FAIL,
        {"id": job_id, "attempt": attempt, "lease_token": lease_token, "node": node, "error": error[:8000],
         "retry": retry,
         "backoff": backoff, "event_node": node, "event_message": error[:500],
         "event_failure_kind": FailureKind(kind).value},
    ))


_CANCEL_RUNNING = DefinerFunction(
    "nexus_w_cancelled", {"id": "uuid", "attempt": "int", "lease_token": "uuid", **EVENT_PARAMS}, _OUTCOME_RETURNS,
    transition_sql(JobState.CANCELLED.value, where=_FENCED, sets="finished_at = now(), lease_expires_at = NULL",
                    returning=_OUTCOME_COLUMNS))


def mark_cancelled(conn: Connection, job_id: uuid.UUID | str, attempt: int, node: str,
                   lease_token: uuid.UUID | None = None) -> Outcome | None:
    """A running attempt saw the cancel flag and stopped."""
    return _outcome(run_transition(conn, _CANCEL_RUNNING, {"id": job_id, "attempt": attempt,
                                                           "lease_token": lease_token, "event_node": node,
                                                           "event_message": "cancelled while running"}))


_CANCEL_WAITING = transition_sql(
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
    run_transition(conn, _CANCEL_WAITING, {"id": job_id, "event_message": f"cancelled by {by or 'request'}"})
    conn.execute(_REQUEST_CANCEL, {"id": job_id})
    for (child_id,) in conn.execute(_ACTIVE_CHILDREN, {"id": job_id}).all():
        request_cancel(conn, child_id, by=f"parent {job_id}")


_MANUAL_RETRY = transition_sql(
    JobState.RETRYING.value,
    where=sql_in("j.state", RETRYABLE_BY_HAND),
    sets="""max_attempts = GREATEST(j.max_attempts, j.attempt + 1), cancel_requested = false,
            not_before = now(), finished_at = NULL, published_attempt = j.attempt, error = NULL""",
    returning=select_list("j."),
)


def manual_retry(conn: Connection, job_id: uuid.UUID | str, by: str | None = None) -> Job | None:
    """Give a failed or cancelled job one more attempt (the job as it now is); the reconciler publishes it."""
    row = run_transition(conn, _MANUAL_RETRY, {"id": job_id, "event_message": f"retry requested by {by or 'request'}"})
    return Job.from_mapping(row) if row is not None else None


_PROGRESS = DefinerFunction("nexus_w_progress", {"id": "uuid", "attempt": "int", "lease_token": "uuid",
                                                  "progress": "jsonb"}, None,
                            f"UPDATE jobs j SET progress = :progress WHERE {_FENCED}")


def set_progress(conn: Connection, job_id: uuid.UUID | str, attempt: int, progress: dict[str, Any],
                 lease_token: uuid.UUID | None = None) -> None:
    _PROGRESS.execute(conn, {"id": job_id, "attempt": attempt, "lease_token": lease_token,
                             "progress": json.dumps(progress)})


def _json(value: Any) -> str | None:
    """Bind a Python value to a JSONB parameter (None stays SQL NULL)."""
    return None if value is None else json.dumps(value)


Result = TypeVar("Result")


def run_in_transaction(engine: Engine, fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    with engine.begin() as conn:
        return fn(conn, *args, **kwargs)


# Every write a worker makes about its own attempt, as the functions its database role may call
# (nexus.jobs.worker_role); its writes about its children are nexus.jobs.children.WORKER_WRITES.
WORKER_WRITES = (CLAIM, RENEW, _PROGRESS, _COMPLETE, _FAIL, _CANCEL_RUNNING)
