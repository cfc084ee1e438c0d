"""What a job handler sees: its identity, storage, progress, cancellation and children."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from nexus.config import Settings
from nexus.jobs import children as child_writes  # not `children`: JobContext.children is a method
from nexus.jobs import lifecycle, queries
from nexus.jobs.fanout import check_fan_out
from nexus.jobs.notify import ChildNotices
from nexus.jobs.records import Job, Lease

if TYPE_CHECKING:
    import redis

    from nexus.jobs.submit import Submitter
    from nexus.replicas import NodeReads
    from nexus.storage import ObjectStore
    from nexus.storage.leased import LeaseGrants


class JobCancelled(Exception):
    """Raised inside a handler when its job was cancelled; the worker records `cancelled`."""


class JobLost(Exception):
    """Raised inside a handler when its attempt lost the lease; the newer attempt owns the job."""


@dataclass
class JobContext:
    job_id: uuid.UUID
    attempt: int
    node: str
    tenant: str
    input_key: str | None
    settings: Settings
    engine: Engine
    storage: "ObjectStore"
    submitter: "Submitter"
    # Replica-aware reads (docs/ARCHITECTURE.md, "Replicas for lag-tolerant reads"): the master WAL position
    # the message carried, and the
    # node's read paths. None: read everything from the master.
    read_after_lsn: str | None = None
    reads: "NodeReads | None" = None
    lease_token: uuid.UUID | None = None  # the claim's: shown by every write and read of this attempt
    # The runner's own: the node's standing store and its way to lease-scoped objects (JobRunner), for a
    # handler that runs other attempts itself (a proof proving its segments).
    node_storage: "ObjectStore | None" = None
    grants: "LeaseGrants | None" = None
    notices: "redis.Redis | None" = None  # the master's Redis, where jobs' completion notices go (jobs/notify.py)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    lost_event: threading.Event = field(default_factory=threading.Event)
    _last_progress: float = 0.0

    @property
    def lease(self) -> Lease:
        return Lease(self.job_id, self.attempt, self.lease_token)

    def own_job(self) -> Job:
        """This attempt's own row, from the master (JobLost once the attempt lost its lease)."""
        with self.engine.connect() as conn:
            job = queries.own_job(conn, self.lease)
        if job is None:
            raise JobLost(str(self.job_id))
        return job

    def parent(self) -> Job | None:
        """The job this one is a child of (a verification's proof)."""
        with self.engine.connect() as conn:
            return queries.parent_job(conn, self.lease)

    # --- cooperative cancellation ---------------------------------------------
    def check_cancelled(self) -> None:
        """Call between steps: stops the handler if the job was cancelled or taken over."""
        if self.lost_event.is_set():
            raise JobLost(str(self.job_id))
        if self.cancel_event.is_set():
            raise JobCancelled(str(self.job_id))

    def sleep(self, seconds: float, step: float = 0.1) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.check_cancelled()
            time.sleep(min(step, remaining))
        self.check_cancelled()

    def child_notices(self) -> ChildNotices:
        """For a handler waiting on its children: `with ctx.child_notices() as notices: ... notices.sleep(s, ids)`
        sleeps until one of those children ends (nexus.jobs.notify.ChildNotices)."""
        return ChildNotices(self.notices, self.sleep, self.check_cancelled)

    # --- progress ----------------------------------------------------------------
    def progress(self, done: int, total: int, message: str | None = None, *, force: bool = False) -> None:
        """Record progress; throttled to a few writes a second unless `force` or done."""
        now = time.monotonic()
        if not force and done < total and now - self._last_progress < 0.5:
            return
        self._last_progress = now
        body: dict[str, Any] = {"done": done, "total": total}
        if message:
            body["message"] = message
        with self.engine.begin() as conn:
            lifecycle.set_progress(conn, self.job_id, self.attempt, body, self.lease_token)

    # --- objects -------------------------------------------------------------------
    def read_input(self) -> bytes:
        if not self.input_key:
            raise ValueError("this job has no input object")
        return self.storage.get_bytes(self.settings.bucket_inputs, self.input_key)

    def output_key(self, name: str = "output") -> str:
        return f"jobs/{self.job_id}/{name}"

    def write_output(self, data: bytes, name: str = "output", content_type: str = "application/octet-stream") -> str:
        """Store bytes in the outputs bucket; return its key (the API presigns it for clients)."""
        key = self.output_key(name)
        self.storage.put_bytes(self.settings.bucket_outputs, key, data, content_type)
        return key

    # --- child jobs ------------------------------------------------------------------
    def submit_children(self, specs: list[dict[str, Any]]) -> list[str]:
        """Submit child jobs; idempotent per `idempotency_key`, so a retried parent finds its children.

        Raises TooManyChildren (the job fails, not retried) past Settings.max_children_per_job."""
        specs = [{**spec, "idempotency_key": f"{self.job_id}:{spec['idempotency_key']}"}
                 if spec.get("idempotency_key") else spec for spec in specs]
        check_fan_out(self._other_children([s.get("idempotency_key") for s in specs]) + len(specs), self.settings)
        return [str(job_id) for job_id in self.submitter.submit_children(self.lease, self.tenant, specs)]

    def _other_children(self, keys: list[str | None]) -> int:
        """Children this job already has, leaving out those these keys repeat (a retried parent's)."""
        with self.engine.connect() as conn:
            return queries.count_own_children_besides(conn, self.lease, [k for k in keys if k])

    def children(self) -> list[Job]:
        """This job's children, oldest first."""
        return [child.job for child in self.child_statuses()]

    def child_statuses(self) -> list[queries.ChildStatus]:
        """This job's children with whether each may run now and where it failed, oldest first."""
        with self.engine.connect() as conn:
            return queries.own_children(conn, self.lease)

    def cancel_children(self, child_ids: list[uuid.UUID], by: str) -> int:
        """Cancel these children of this job: waiting ones at once, running ones at their next check."""
        with self.engine.begin() as conn:
            return child_writes.cancel_children(conn, self.lease, child_ids, by)

    def retry_child(self, child_id: uuid.UUID) -> bool:
        """Give a failed or cancelled child one more attempt."""
        with self.engine.begin() as conn:
            return child_writes.retry_child(conn, self.lease, child_id)
