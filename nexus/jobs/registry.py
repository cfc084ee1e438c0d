"""Job types: a name, a handler and optional payload validation and requirements.

Built-in types are declared in pyproject.toml under the `nexus.job_types`
entry-point group, exactly like a third-party package would declare its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from nexus.config import Settings
    from nexus.jobs.context import JobContext

ENTRY_POINT_GROUP = "nexus.job_types"

Handler = Callable[["JobContext", Any], Any]


@dataclass(frozen=True)
class JobType:
    name: str
    run: Handler
    # Returns the normalised payload or raises ValueError with a message for the client (400).
    validate: Callable[[Any], Any] | None = None
    # Requirements a job of this type always has (e.g. {"gpu": True}); the request's own win.
    default_requirements: dict[str, Any] = field(default_factory=dict[str, Any])
    # Whether the job reads an uploaded input object (`input_key`).
    accepts_input: bool = True
    # Whether the handler reads rows through the node's standby (ctx.reads.rows with ctx.read_after_lsn):
    # its messages then carry the master's WAL position after the submission, which costs the submitter
    # one more round trip. Handlers that only read their own job get it from the claim, on the master.
    reads_standby: bool = False
    # Whether clients may submit it through the API. Internal types are created only by the platform
    # (a running parent's children, the /v1 routes, proof verification): their payloads name objects
    # and rows by key, which a client could point at another tenant's data.
    public: bool = True
    # How many child jobs a job with this payload will create, when the payload alone says so
    # (None: not known before it runs). Checked against Settings.max_children_per_job at submit time.
    fan_out: Callable[[Any, "Settings"], int | None] | None = None
    # Whether its jobs wait for their tenant's share of the queue (nexus.jobs.fairshare). A /v1
    # request does not: it was admitted against its model's serving slots (shared by all tenants)
    # and its token's stream slots before it became a job, so it cannot build a backlog, and held
    # it would wait a claim's round trip longer for its first token.
    fair_share: bool = True
    # Runs on the master only (`nexus verifier`), never on a node: what it records must not come from a
    # party it judges (a proof's verdict: its provers are nodes). Its queue is `master.<name>`.
    runs_on_master: bool = False


class UnknownJobType(KeyError):
    pass


_registry: dict[str, JobType] = {}
_loaded = False
_lock = threading.Lock()


def register(job_type: JobType) -> JobType:
    _registry[job_type.name] = job_type
    return job_type


def _load_entry_points() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _registry:
                continue
            obj = ep.load()
            register(obj if isinstance(obj, JobType) else JobType(name=ep.name, run=obj))
        _loaded = True


def master_job_types() -> list[str]:
    """The types `nexus verifier` runs."""
    _load_entry_points()
    return sorted(name for name, job_type in _registry.items() if job_type.runs_on_master)


def get_job_type(name: str) -> JobType:
    _load_entry_points()
    try:
        return _registry[name]
    except KeyError:
        raise UnknownJobType(name) from None


def job_type_names() -> list[str]:
    _load_entry_points()
    return sorted(_registry)


def public_job_type_names() -> list[str]:
    _load_entry_points()
    return sorted(name for name, job_type in _registry.items() if job_type.public)
