"""A worker serving models: load each once per process, keep its instance row and liveness fresh.

`nexus worker --model NAME` (or NEXUS_WORKER_MODELS) builds one ModelServing
before the Celery pool starts, so the model is loaded in the process that will
use it (never in `worker_process_init`, which is killed after 4 s), and the
worker consumes `model.NAME` next to its tier queues. Job handlers find the
backend through `current()`.

Lifecycle of an instance, as this worker drives it:

    pending ──adopt──► downloading (s3 source) ──► starting ──► running
                                      └──────────── error ◄──────┘
    running ──DELETE──► stopped: stop consuming the model queue, free the backend,
                        then wait in standby for the next pending instance of the model
    running ──worker shuts down (agent drain, SIGTERM)──► pending: the next worker
                        for this node (the agent's, after a restart) takes it again

A model the worker serves is marked on the node's activity board, which the
agent lists as `loaded_models` in its heartbeats.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

from redis import Redis
from sqlalchemy import Engine

from nexus.activity import ActivityBoard
from nexus.config import Settings
from nexus.jobs.failures import FailureKind
from nexus.models import catalog, liveness
from nexus.serving.backends import BackendRequest, make_backend
from nexus.serving.backends.base import InferenceBackend
from nexus.models.catalog import InstanceState, ModelSpec
from nexus.models.placement import ParallelismPlan
from nexus.serving.weights import local_model_path
from nexus.localservers import free_port
from nexus.queueing.routing import model_queue
from nexus.replicas import make_read_store
from nexus.storage import ObjectStore

log = logging.getLogger(__name__)


class ModelNotServedHere(RuntimeError):
    """A request reached a worker that does not (or no longer) serve its model: the node's failure."""

    failure_kind = FailureKind.INFRASTRUCTURE  # nexus.jobs.failures


class ServingStartError(RuntimeError):
    pass


@dataclass
class QueueControl:
    """Start and stop consuming a queue in this worker (Celery's add/cancel consumer)."""

    add: Callable[[str], None] = lambda queue: None
    cancel: Callable[[str], None] = lambda queue: None

    @classmethod
    def for_celery(cls, app, hostname: str) -> "QueueControl":
        return cls(add=lambda q: app.control.add_consumer(q, destination=[hostname], reply=False),
                   cancel=lambda q: app.control.cancel_consumer(q, destination=[hostname], reply=False))


@dataclass
class ServedModel:
    name: str
    port: int  # a vLLM server's loopback port
    spec: ModelSpec | None = None
    instance_id: uuid.UUID | None = None
    instance_token: uuid.UUID | None = None  # drawn when this worker took the instance: its writes show it
    backend: InferenceBackend | None = None

    @property
    def serving(self) -> bool:
        return self.backend is not None and self.instance_id is not None


@dataclass
class ModelServing:
    settings: Settings
    engine: Engine
    redis: Redis
    store: ObjectStore
    worker: str
    control: QueueControl = field(default_factory=QueueControl)
    board: ActivityBoard | None = None  # the node's activity board: which models are loaded here
    models: dict[str, ServedModel] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def node_id(self) -> str | None:
        return self.settings.node_id or None

    @property
    def queues(self) -> list[str]:
        return [model_queue(name) for name in self.models]

    # --- start and stop --------------------------------------------------------------

    def start(self, names: list[str]) -> list[str]:
        """Load every model (an instance each) before the worker consumes; returns their queues."""
        names = list(dict.fromkeys(names))
        if self.settings.worker_instance_id and len(names) != 1:
            raise ServingStartError("a worker started for one instance (NEXUS_WORKER_INSTANCE_ID) serves one model")
        try:
            for name in names:
                self._start_one(name)
        except BaseException:  # a model that failed, or SIGTERM half-way: free the ones already loaded
            self.close()
            raise
        self._thread = threading.Thread(target=self._heartbeat_loop, name="nexus-serving", daemon=True)
        self._thread.start()
        return self.queues

    def _start_one(self, name: str) -> None:
        served = self.models[name] = ServedModel(name, free_port())
        with self.engine.begin() as conn:
            spec = catalog.get_model(conn, name)
            if spec is None:
                raise ServingStartError(f"model {name!r} is not in the catalog: declare it first "
                                        "(POST /api/v1/models or `nexus models add`)")
            instance = self._first_instance(conn, name)
        if not self._bring_up(served, spec, instance):
            raise ServingStartError(f"model {name!r} failed to start; see the instance's error")

    def _first_instance(self, conn, name: str) -> dict:
        """The instance the agent named, else a pending one placed here, else a new one of our own."""
        if self.settings.worker_instance_id:
            instance = catalog.take_held_instance(conn, uuid.UUID(self.settings.worker_instance_id), name,
                                                  self.node_id, self.worker)
            if instance is None:
                raise ServingStartError(f"instance {self.settings.worker_instance_id} of {name!r} is stopped "
                                        "or unknown")
            return instance
        instance = catalog.adopt_held_instance(conn, name, self.node_id, self.worker) or \
            catalog.start_held_instance(conn, name, self.node_id, self.worker)
        if instance is None:
            raise ServingStartError(f"model {name!r} is not in the catalog")
        return instance

    def close(self, state: InstanceState = InstanceState.PENDING) -> None:
        """The worker is going away: free every backend and leave its instance `state`.

        Pending by default: the instance is still wanted (a stopped one stays stopped), and the
        next worker for it, such as the agent's after a restart, takes it again."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)  # a beat in progress must not re-announce what we withdraw
        for served in self.models.values():
            self._take_down(served, state)

    def backend_for(self, name: str) -> InferenceBackend:
        served = self.models.get(name)
        if served is None or served.backend is None:
            raise ModelNotServedHere(f"worker {self.worker} does not serve model {name!r}")
        return served.backend

    # --- one instance ------------------------------------------------------------------

    def _bring_up(self, served: ServedModel, spec: ModelSpec, instance: dict) -> bool:
        served.spec, served.instance_id, served.instance_token = spec, instance["id"], instance["worker_token"]
        try:
            path = None
            if spec.backend is not catalog.BackendKind.OPENAI:
                if spec.s3_location:
                    self._set_state(served, InstanceState.DOWNLOADING)
                path = local_model_path(spec, self.store, self.settings.data_dir / "models")
            self._set_state(served, InstanceState.STARTING)
            plan = ParallelismPlan.from_dict(instance.get("plan") or {})
            served.backend = make_backend(BackendRequest(spec, self.settings, path, plan, served.port))
        except Exception as exc:  # any failure to load is the instance's error, reported, not the worker's death
            log.error("model %s failed to start: %s\n%s", spec.name, exc, traceback.format_exc())
            self._set_state(served, InstanceState.ERROR, f"{type(exc).__name__}: {exc}"[:2000])
            served.instance_id = None
            return False
        if self._set_state(served, InstanceState.RUNNING) is None:  # stopped while starting
            self._take_down(served, None)
            return False
        liveness.announce(self.redis, spec.name, str(served.instance_id), self._ttl, self._slots)
        if self.board is not None:
            self.board.model_loaded(spec.name)
        log.info("model %s serving (instance %s)", spec.name, served.instance_id)
        return True

    def _take_down(self, served: ServedModel, state: InstanceState | None) -> None:
        if served.instance_id is not None:
            try:
                liveness.withdraw(self.redis, served.name, str(served.instance_id))
                if state is not None:
                    self._set_state(served, state)
            except Exception as exc:  # shutting down with the database or Redis away: nothing to add
                log.warning("could not record that %s stopped: %s", served.name, exc)
        if served.backend is not None:
            served.backend.close()
            if self.board is not None:
                self.board.model_unloaded(served.name)
        served.backend, served.instance_id = None, None

    def _set_state(self, served: ServedModel, state: InstanceState, error: str | None = None) -> dict | None:
        with self.engine.begin() as conn:
            return catalog.set_held_instance_state(conn, served.instance_id, served.instance_token, state, error,
                                                   self.worker)

    # --- heartbeat ------------------------------------------------------------------------

    @property
    def _ttl(self) -> float:
        return self.settings.inference_heartbeat_seconds * 3

    @property
    def _slots(self) -> int:
        """Requests an instance here runs at once (the node's max_concurrent): the API admits that many."""
        return self.settings.inference_concurrency

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.inference_heartbeat_seconds):
            for served in list(self.models.values()):
                try:
                    self.heartbeat(served)
                except Exception as exc:  # the database or Redis is away; the next beat tries again
                    log.warning("heartbeat of model %s failed: %s", served.name, exc)

    def heartbeat(self, served: ServedModel) -> None:
        if served.serving:
            with self.engine.begin() as conn:
                state = catalog.held_instance_heartbeat(conn, served.instance_id, served.instance_token, served.name,
                                                        self.node_id, self.worker)
            if state in (None, InstanceState.STOPPED.value):
                log.info("instance %s of %s was stopped; standing by", served.instance_id, served.name)
                self.control.cancel(model_queue(served.name))
                self._take_down(served, None)
            else:
                liveness.announce(self.redis, served.name, str(served.instance_id), self._ttl, self._slots)
            return
        if self.settings.worker_instance_id:
            return  # started by an agent for one instance: the agent stops this worker now
        with self.engine.begin() as conn:  # standby: take the next instance deployed for this model
            spec = catalog.get_model(conn, served.name)
            instance = catalog.adopt_held_instance(conn, served.name, self.node_id, self.worker) if spec else None
        if instance is not None and self._bring_up(served, spec, instance):
            self.control.add(model_queue(served.name))


_current: ModelServing | None = None


def set_current(serving: ModelServing | None) -> None:
    global _current
    _current = serving


def current() -> ModelServing:
    if _current is None:
        raise ModelNotServedHere("this worker serves no models (start it with `nexus worker --model NAME`)")
    return _current


def start_serving(settings: Settings, celery_app, hostname: str, names: list[str]) -> ModelServing:
    """Build the process's ModelServing, load the models; the caller adds `serving.queues` to the worker."""
    from nexus.services import Services

    services = Services(settings)
    # Weights read through the node's local S3 mirror when NEXUS_REPLICA_S3_* names one
    # (docs/ARCHITECTURE.md, "Replicas for lag-tolerant reads").
    store = make_read_store(settings, services.store)
    # The engine thread computes with the GIL held most of the time; request threads (claims, Redis,
    # PostgreSQL) wait for it after every I/O, up to one switch interval each. Python's default of
    # 5 ms makes that tens of milliseconds per request and empties batch slots meanwhile.
    sys.setswitchinterval(settings.inference_switch_interval_ms / 1000)
    serving = ModelServing(settings, services.engine, services.redis, store, hostname,
                           QueueControl.for_celery(celery_app, hostname), ActivityBoard.for_settings(settings))
    if threading.current_thread() is threading.main_thread():
        # Until Celery installs its own handlers: a SIGTERM while the model loads (the agent stopping
        # the instance, or draining) unwinds through `start`, which frees what was loaded.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    serving.start(names)
    set_current(serving)
    return serving


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def model_names(settings: Settings, cli_names: tuple[str, ...] = ()) -> list[str]:
    return list(dict.fromkeys([*cli_names, *(n.strip() for n in settings.worker_models.split(",") if n.strip())]))
