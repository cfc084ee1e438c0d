"""The worker's PostgreSQL role: no superuser, owns nothing, reaches jobs only through the worker's operations
(docs/ARCHITECTURE.md, "Roles hold only what they need").

The master creates it at start (nexus.master.prepare_master), idempotently and under a lock, so several
masters and test sessions may run this at once. Roles are cluster-wide in PostgreSQL: the name carries the
database's (`credentials.worker_role_name`), so clusters sharing a server never share a worker role.

What the role may do:
  - call the SECURITY DEFINER functions below: claim, renew leases, progress, complete, fail, record a
    cancel, submit / read / retry / withdraw children of its own running attempt, read its own row and
    its parent's, the retry context that decides whether to decline a message, a waiting job's spec,
    publishing a tenant's next held jobs when its claim freed a place (nexus.jobs.fairshare);
    each one whole guarded statement with the attempt fence and lease token inside;
  - take, heartbeat and set the state of a model instance through the functions of nexus.models.catalog
    (WORKER_INSTANCE_WRITES, passed in by the master: this package may not import that one), each fenced
    by the token the worker drew when it took that instance;
  - read the model catalog;
  - nothing else: no table of jobs, events, tokens, nodes or instances, no DDL, no other schema object.
"""

from __future__ import annotations

import logging
import math

from sqlalchemy import Connection, Engine, text

from nexus.config import Settings
from nexus.credentials import worker_role_name
from nexus.db.functions import MAX_CHILDREN_MARK, DefinerFunction
from nexus.jobs import children, digest, fairshare, lifecycle, placement, queries
from nexus.queueing.celery_app import PUBLISH_GIVE_UP_SECONDS

log = logging.getLogger(__name__)

# The job writes are joined here, where they are consumed: children imports lifecycle, never the reverse.
WORKER_FUNCTIONS: tuple[DefinerFunction, ...] = (
    *lifecycle.WORKER_WRITES, *children.WORKER_WRITES, *queries.WORKER_READS, placement.RETRY_CONTEXT, digest.JOB_SPEC,
    fairshare.REFILL)

# A serving worker reads the catalog (nexus.serving.host); its instance rows it writes through functions.
_TABLE_GRANTS = ("GRANT SELECT ON models TO {role}",)

_LOCK_ID = 0x4E585752  # serialises concurrent installs: CREATE OR REPLACE FUNCTION races otherwise


def install_worker_role(engine: Engine, settings: Settings, more: tuple[DefinerFunction, ...] = ()) -> str:
    """Create or refresh the worker role of this database and its functions (WORKER_FUNCTIONS and `more`, those
    of the packages after this one); returns the role's name."""
    database = engine.url.database or ""
    role = worker_role_name(database)
    marks = {MAX_CHILDREN_MARK: str(settings.max_children_per_job)}
    functions = (*WORKER_FUNCTIONS, *more)
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        _ensure_role(conn, role, settings.worker_database_password)
        _bound_idle_transactions(conn, role, idle_transaction_limit_ms(settings))
        _grant(conn, role, database)
        for function in functions:
            conn.exec_driver_sql(function.create_sql(role, marks).replace("%", "%%"))  # psycopg2 formats it
    log.info("worker role %s ready (%d functions)", role, len(functions))
    return role


def _ensure_role(conn: Connection, role: str, password: str) -> None:
    quoted = f'"{role}"'
    # CREATE ROLE has no IF NOT EXISTS; a concurrent creator (another database's master cannot: the
    # name is this database's) is caught as duplicate_object.
    conn.exec_driver_sql(f"""DO $$ BEGIN CREATE ROLE {quoted} LOGIN;
                             EXCEPTION WHEN duplicate_object THEN NULL; END $$""")
    attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT"
    if password:
        conn.exec_driver_sql(f"ALTER ROLE {quoted} {attributes} PASSWORD %(password)s", {"password": password})
    else:  # dev and tests on trust authentication
        conn.exec_driver_sql(f"ALTER ROLE {quoted} {attributes} PASSWORD NULL")


def idle_transaction_limit_ms(settings: Settings) -> int:
    """How long a worker's session may sit in an open transaction, idle, before PostgreSQL ends it.

    A worker frozen (SIGSTOP, swapped out) or cut off between two statements of one transaction keeps
    its locks for as long as its connection stays open: row locks that the reconciler's lease expiry
    skips (so the frozen attempt's lease never expired), and a tenant's refill lock that the other
    workers' refills of that tenant, and the reconciler, waited on. Its lease is gone after `job_lease_seconds`
    anyway, so its transactions end then too. Never shorter than a publish inside a refill
    transaction may take while the broker is away (PUBLISH_GIVE_UP_SECONDS)."""
    return math.ceil(1000 * max(settings.job_lease_seconds, 2 * PUBLISH_GIVE_UP_SECONDS))


def _bound_idle_transactions(conn: Connection, role: str, limit_ms: int) -> None:
    # A role setting applies to every new session of the role, whatever its client asks for first.
    conn.exec_driver_sql(f'ALTER ROLE "{role}" SET idle_in_transaction_session_timeout = {limit_ms}')


def _grant(conn: Connection, role: str, database: str) -> None:
    quoted = f'"{role}"'
    conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{database}" TO {quoted}')
    conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {quoted}")
    # Whatever it was granted before (an older master, an operator) goes; then exactly what it needs.
    conn.exec_driver_sql(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}")
    conn.exec_driver_sql(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {quoted}")
    # PostgreSQL before 15 let every role create objects in `public`; the worker must not (DDL).
    conn.exec_driver_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    for grant in _TABLE_GRANTS:
        conn.exec_driver_sql(grant.format(role=quoted))
