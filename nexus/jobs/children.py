"""A running job's writes about its children, made by its worker under the parent's lease (docs/ARCHITECTURE.md,
"Roles hold only what they need").

Submitting children (nexus.jobs.submit.Submitter.submit_children, for JobContext.submit) and withdrawing
those whose messages could not be published, retrying a failed child, cancelling those the parent no
longer waits for (nexus.jobs.context.JobContext). Each is one SECURITY DEFINER function the worker role
may call, fenced by the parent's attempt and lease token (lifecycle.holds_lease): it writes other jobs'
rows on behalf of the running parent, so it is kept apart from nexus.jobs.lifecycle, whose writes are a
job's own transitions. This module builds on that one (the fence, the transition statement); never the reverse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping
from sqlalchemy.exc import DBAPIError

from nexus.db.functions import MAX_CHILDREN_MARK, WORKER_ROLE_MARK, DefinerFunction
from nexus.jobs.fanout import TooManyChildren
from nexus.jobs.lifecycle import EVENT_PARAMS, JobSpec, holds_lease, run_transition, transition_returns, transition_sql
from nexus.jobs.records import Lease
from nexus.jobs.states import ACTIVE_STATES, RETRYABLE_BY_HAND, JobState, sql_in
from nexus.queueing.routing import MASTER_QUEUE_PREFIX


# The tenant and the parent come from the parent's row, never from the caller; a child never outranks
# its parent, and a worker puts none on the master's queues (the verifier would run it with the master's
# credentials). An idempotent repeat answers with the parent's existing child of that key.
TOO_MANY_CHILDREN_SQLSTATE = "NXC01"  # raised by nexus_w_submit_children past the fan-out limit

_INSERT_CHILDREN = DefinerFunction("nexus_w_submit_children", {
    "id": "uuid", "attempt": "int", "lease_token": "uuid", "ids": "uuid[]", "types": "text[]",
    "payloads": "jsonb[]", "input_keys": "text[]", "requirements": "jsonb[]", "queues": "text[]",
    "priorities": "smallint[]", "max_attempts": "int[]", "idem_keys": "text[]"},
    {"id": "jobs.id%TYPE", "created_at": "jobs.created_at%TYPE", "idempotency_key": "jobs.idempotency_key%TYPE",
     "created": "boolean"}, f"""
    WITH parent AS (SELECT p.id, p.tenant, p.priority FROM jobs p WHERE {holds_lease("p")}),
    ins AS (
    INSERT INTO jobs (id, type, payload, input_key, requirements, queue, priority, max_attempts, tenant,
                      idempotency_key, parent_id, published_at)
    SELECT t.cid, t.ctype, t.cpayload, t.cinput, t.creq, t.cqueue, LEAST(t.cprio, parent.priority), t.cmax,
           parent.tenant, t.ckey, parent.id, now()
    FROM parent, unnest(:ids, :types, :payloads, :input_keys, :requirements, :queues, :priorities,
                        :max_attempts, :idem_keys) AS t(cid, ctype, cpayload, cinput, creq, cqueue, cprio, cmax, ckey)
    WHERE t.cqueue NOT LIKE '{MASTER_QUEUE_PREFIX}%' OR session_user <> '{WORKER_ROLE_MARK}'
    ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, created_at, idempotency_key
    ),
    ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, message)
        SELECT id, NULL, 'queued', 0, 'submitted' FROM ins
    )
    SELECT id, created_at, idempotency_key, true FROM ins
    UNION ALL
    SELECT e.id, e.created_at, e.idempotency_key, false FROM jobs e, parent
    WHERE e.parent_id = parent.id AND e.tenant = parent.tenant AND e.idempotency_key = ANY(:idem_keys)""",
    # The fan-out limit, enforced where children are made: the children this job already has (but those
    # these keys repeat, a retried parent's) and these may not pass NEXUS_MAX_CHILDREN_PER_JOB, which the
    # master writes into the function (MAX_CHILDREN_MARK). JobContext checks it first, for a clear message.
    first=f"""
    IF (SELECT count(*) FROM jobs c WHERE c.parent_id = _id
          AND (c.idempotency_key IS NULL OR c.idempotency_key <> ALL(array_remove(_idem_keys, NULL))))
       + cardinality(_ids) > {MAX_CHILDREN_MARK} THEN
        RAISE EXCEPTION 'this job would create more than {MAX_CHILDREN_MARK} child jobs'
            USING ERRCODE = '{TOO_MANY_CHILDREN_SQLSTATE}';
    END IF""")


@dataclass(frozen=True)
class ChildRow:
    id: uuid.UUID
    created_at: Any
    created: bool  # False: an idempotent repeat, `id` is the existing child


def insert_children(conn: Connection, lease: Lease, specs: list[JobSpec]) -> dict[uuid.UUID, ChildRow]:
    """Insert a running job's children (and their events) in one statement: {spec id: row}; a spec missing
    from the answer was not inserted (the parent's lease is gone, or its key names another job's child).
    TooManyChildren when they would pass the master's NEXUS_MAX_CHILDREN_PER_JOB (nothing inserted)."""
    if not specs:
        return {}
    try:
        rows = _insert_children(conn, lease, specs)
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) == TOO_MANY_CHILDREN_SQLSTATE:
            message = str(exc.orig).splitlines()[0]
            limit = int(re.search(r"more than (\d+)", message).group(1))  # type: ignore[union-attr]
            raise TooManyChildren(f"{message} (NEXUS_MAX_CHILDREN_PER_JOB)", len(specs), limit) from None
        raise
    by_id = {row["id"]: row for row in rows if row["created"]}
    by_key = {row["idempotency_key"]: row for row in rows if not row["created"]}
    out: dict[uuid.UUID, ChildRow] = {}
    for spec in specs:
        row = by_id.get(spec.id) or (by_key.get(spec.idempotency_key) if spec.idempotency_key else None)
        if row is not None:
            out[spec.id] = ChildRow(row["id"], row["created_at"], bool(row["created"]))
    return out


def _insert_children(conn: Connection, lease: Lease, specs: list[JobSpec]) -> list[RowMapping]:
    return _INSERT_CHILDREN.execute(conn, {
        "id": lease.job_id, "attempt": lease.attempt, "lease_token": lease.token,
        "ids": [s.id for s in specs], "types": [s.type for s in specs],
        "payloads": [json.dumps(s.payload) for s in specs], "input_keys": [s.input_key for s in specs],
        "requirements": [json.dumps(s.requirements) for s in specs], "queues": [s.queue for s in specs],
        "priorities": [s.priority for s in specs], "max_attempts": [s.max_attempts for s in specs],
        "idem_keys": [s.idempotency_key for s in specs]})


_DELETE_UNSTARTED_CHILDREN = DefinerFunction(
    "nexus_w_delete_unstarted_children", {"id": "uuid", "attempt": "int", "lease_token": "uuid", "ids": "uuid[]"},
    None, f"""DELETE FROM jobs c USING jobs p WHERE {holds_lease("p")} AND c.parent_id = p.id
              AND c.id = ANY(:ids) AND c.state = '{JobState.QUEUED.value}' AND c.attempt = 0""")


def delete_unstarted_children(conn: Connection, lease: Lease, ids: list[uuid.UUID]) -> None:
    """Undo children whose messages could not be published."""
    _DELETE_UNSTARTED_CHILDREN.execute(conn, {"id": lease.job_id, "attempt": lease.attempt,
                                              "lease_token": lease.token, "ids": ids})


_RETRY_CHILD = DefinerFunction(
    "nexus_w_retry_child", {"id": "uuid", "parent_id": "uuid", "parent_attempt": "int", "lease_token": "uuid",
                            **EVENT_PARAMS},
    transition_returns(["id", "state", "attempt"]), transition_sql(
        JobState.RETRYING.value,
        where=sql_in("j.state", RETRYABLE_BY_HAND) + " AND j.parent_id = :parent_id AND EXISTS (SELECT 1 FROM jobs p "
              "WHERE " + holds_lease("p", ":parent_id", ":parent_attempt") + ")",
        sets="""max_attempts = GREATEST(j.max_attempts, j.attempt + 1), cancel_requested = false,
                not_before = now(), finished_at = NULL, published_attempt = j.attempt, error = NULL""",
        returning="j.id, j.state, j.attempt"))


def retry_child(conn: Connection, lease: Lease, child_id: uuid.UUID) -> bool:
    """A running parent gives its failed or cancelled child one more attempt (a retried proof's segments)."""
    row = run_transition(conn, _RETRY_CHILD, {
        "id": child_id, "parent_id": lease.job_id, "parent_attempt": lease.attempt, "lease_token": lease.token,
        "event_message": f"retry requested by parent {lease.job_id} attempt {lease.attempt}"})
    return row is not None


# A running parent stops children it no longer waits for (a benchmark's node past its timeout): a
# waiting child is cancelled at once, a running one is asked to stop (the flag its attempt checks).
_CANCEL_CHILDREN = DefinerFunction(
    "nexus_w_cancel_children", {"id": "uuid", "attempt": "int", "lease_token": "uuid", "ids": "uuid[]",
                                "message": "text"},
    {"id": "jobs.id%TYPE"}, f"""
    WITH parent AS (SELECT p.id FROM jobs p WHERE {holds_lease("p")}),
    upd AS (
        UPDATE jobs c SET cancel_requested = true, updated_at = now(),
            state = CASE WHEN c.state IN ('queued', 'retrying') THEN 'cancelled' ELSE c.state END,
            finished_at = CASE WHEN c.state IN ('queued', 'retrying') THEN now() ELSE c.finished_at END
        FROM parent, (SELECT id, state AS before FROM jobs WHERE id = ANY(:ids) FOR UPDATE) old
        WHERE c.id = old.id AND c.parent_id = parent.id AND {sql_in("c.state", ACTIVE_STATES)}
        RETURNING c.id, old.before, c.state, c.attempt
    ),
    ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, message)
        SELECT id, before, state, attempt, :message FROM upd WHERE state <> before
    )
    SELECT id FROM upd""")


def cancel_children(conn: Connection, lease: Lease, ids: list[uuid.UUID], by: str) -> int:
    """Cancel these children of the running attempt (waiting ones at once, running ones by the flag)."""
    return len(_CANCEL_CHILDREN.execute(conn, {"id": lease.job_id, "attempt": lease.attempt,
                                               "lease_token": lease.token, "ids": ids,
                                               "message": f"cancelled by {by}"}))


# The worker's writes about its children, as the functions its database role may call (nexus.jobs.worker_role
# installs them after lifecycle.WORKER_WRITES, the writes about its own attempt).
WORKER_WRITES = (_INSERT_CHILDREN, _CANCEL_CHILDREN, _DELETE_UNSTARTED_CHILDREN, _RETRY_CHILD)
