"""Running one job attempt inside a worker: claim, keep the lease, run, record the outcome."""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from nexus.jobs.placement import decline_retry
from nexus.config import Settings
from nexus.db.engine import autocommit
from nexus.jobs import fairshare, lifecycle
from nexus.jobs.context import JobCancelled, JobContext, JobLost
from nexus.jobs.failures import failure_kind
from nexus.jobs.notify import Notifier
from nexus.jobs.records import Claimed, Outcome
from nexus.jobs.registry import UnknownJobType, get_job_type
from nexus.jobs.submit import Submitter
from nexus.storage import ObjectStore

if TYPE_CHECKING:
    from nexus.replicas import NodeReads
    from nexus.storage.leased import LeaseGrants

log = logging.getLogger(__name__)


class LeaseRenewer:
    """One thread per worker process renews the leases of every attempt it runs, in one statement.

    Relays the cancel flag to each handler and tells a handler whose attempt was
    fenced off (a newer attempt owns the job) to stop. One statement per
    interval, however many jobs run, keeps the database load flat.
    """

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = autocommit(engine)  # one statement per renewal
        self.settings = settings
        self._active: dict[uuid.UUID, JobContext] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def track(self, ctx: JobContext) -> None:
        with self._lock:
            self._active[ctx.job_id] = ctx
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lease-renewer", daemon=True)
                self._thread.start()

    def untrack(self, ctx: JobContext) -> None:
        with self._lock:
            if self._active.get(ctx.job_id) is ctx:
                del self._active[ctx.job_id]

    def _loop(self) -> None:
        while True:
            time.sleep(self.settings.job_heartbeat_seconds)
            with self._lock:
                contexts = dict(self._active)
            if contexts:
                self.renew(contexts)

    def renew(self, contexts: dict[uuid.UUID, JobContext]) -> None:
        try:
            with self.engine.begin() as conn:
                owned = lifecycle.renew_leases(conn, {jid: c.attempt for jid, c in contexts.items()},
                                               self.settings.job_lease_seconds,
                                               {jid: c.lease_token for jid, c in contexts.items()})
        except OperationalError:
            log.warning("lease renewal failed; database unreachable")
            return
        for job_id, ctx in contexts.items():
            if job_id not in owned:
                ctx.lost_event.set()
            elif owned[job_id]:
                ctx.cancel_event.set()


class JobRunner:
    """Per worker process: executes the messages Celery hands it."""

    def __init__(self, settings: Settings, engine: Engine, storage: ObjectStore, submitter: Submitter,
                 notifier: Notifier, node: str, reads: NodeReads | None = None, grants: LeaseGrants | None = None):
        self.settings = settings
        # A worker node's: each job reaches its objects through the master by its lease (nexus.storage.leased);
        # `storage` then holds only the node's standing key (model files). None: `storage` is the master's.
        self.grants = grants
        self.reads = reads  # nexus.replicas.NodeReads: local replicas for reads that tolerate lag
        self.engine = engine
        self.writes = autocommit(engine)  # claim and outcome: one statement, one round trip each
        self.storage = storage
        self.submitter = submitter
        self.notifier = notifier
        self.node = node
        self.leases = LeaseRenewer(engine, settings)

    def execute(self, job_id: str, attempt: int, read_after_lsn: str | None = None) -> str:
        """Returns what happened, for logs and tests: dropped, declined, succeeded, retrying, failed, cancelled, lost."""
        if decline_retry(self.engine, self.submitter.celery, self.settings, job_id, attempt, self.node):
            return "declined"  # it failed here before and another node can take it (nexus.jobs.placement)
        with self.writes.connect() as conn:
            job = lifecycle.claim(conn, uuid.UUID(job_id), attempt, self.node, self.settings.job_lease_seconds,
                                  self.settings.max_broker_messages_per_tenant)
        if job is None:
            return "dropped"
        if job.refill:  # this message was one of its tenant's share of the queue: publish the next held job
            self._refill(job)
        ctx = JobContext(
            job_id=job.id, attempt=job.attempt, node=self.node, tenant=job.tenant, input_key=job.input_key,
            settings=self.settings, engine=self.engine, storage=self._job_store(job), submitter=self.submitter,
            read_after_lsn=read_after_lsn, reads=self.reads, lease_token=job.lease_token,
            node_storage=self.storage, grants=self.grants, notices=self.notifier.redis,
        )
        self.leases.track(ctx)
        try:
            outcome, row = self._run(ctx, job)
        finally:
            self.leases.untrack(ctx)
        if row is not None:
            self.notifier.job_finished(row)
        return outcome

    def _job_store(self, job: Claimed) -> ObjectStore:
        if self.grants is None:
            return self.storage
        leased = self.grants.store(job.id, job.attempt, job.lease_token)
        return self.reads.job_store(leased) if self.reads is not None else leased

    def _refill(self, job: Claimed) -> None:
        try:
            fairshare.refill(self.engine, self.submitter.celery, self.settings, job.tenant, job.queue)
        except Exception as exc:  # the broker or the database is away: the reconciler's pass refills
            log.warning("could not publish the next held job of %s on %s: %s", job.tenant, job.queue, exc)

    def _run(self, ctx: JobContext, job: Claimed) -> tuple[str, Outcome | None]:
        try:
            job_type = get_job_type(job.type)
            result = job_type.run(ctx, job.payload)
        except JobCancelled:
            return "cancelled", self._record(lifecycle.mark_cancelled, ctx.job_id, ctx.attempt, self.node,
                                             ctx.lease_token)
        except JobLost:
            return "lost", None
        except Exception as exc:  # the handler's failure: the job's own unless failure_kind says the node's
            return self._failed(ctx, exc)
        output_key = None
        if isinstance(result, dict) and "_output_key" in result:
            output_key = result.pop("_output_key")
        row = self._record(lifecycle.complete, ctx.job_id, ctx.attempt, self.node, _jsonable(result), output_key,
                           ctx.lease_token)
        return ("succeeded" if row else "lost"), row

    def _failed(self, ctx: JobContext, exc: Exception) -> tuple[str, Outcome | None]:
        retryable = not isinstance(exc, (UnknownJobType, ValueError, TypeError)) or getattr(exc, "retryable", False)
        kind = failure_kind(exc)  # the job's own unless it is the node failing (nexus.jobs.failures)
        error = f"{type(exc).__name__}: {exc}"
        log.info("job %s attempt %s failed (%s): %s\n%s", ctx.job_id, ctx.attempt, kind.value, error,
                 traceback.format_exc())
        backoff = lifecycle.backoff_seconds(
            ctx.attempt, self.settings.retry_backoff_base_seconds, self.settings.retry_backoff_max_seconds
        )
        row = self._record(lifecycle.fail, ctx.job_id, ctx.attempt, self.node, error, retryable, backoff, kind,
                           ctx.lease_token)
        return (row.state if row else "lost"), row

    def _record(self, write: Callable[..., Outcome | None], *args: Any) -> Outcome | None:
        """Write an outcome, riding out a short database outage (the lease covers us meanwhile)."""
        delay = 0.2
        deadline = time.monotonic() + self.settings.job_lease_seconds
        while True:
            try:
                with self.writes.connect() as conn:
                    return write(conn, *args)
            except OperationalError:
                if time.monotonic() > deadline:
                    log.error("could not record the outcome of %s; the reconciler will retry it", args[0])
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 5)


def _jsonable(value: Any) -> Any:
    import json

    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {"repr": repr(value)[:2000]}
