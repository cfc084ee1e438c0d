"""Supervision of child processes: the agent's workers, and the local cluster's servers.

What a node runs is decided elsewhere (nexus.worker.processes builds the worker
children); this module only keeps them running. A child that exits while we did not ask it to is restarted after an
exponential backoff; a child that ran for `reset_after` seconds was healthy,
so its next crash starts the backoff over. Draining sends SIGTERM, which is
Celery's warm shutdown (stop consuming, finish the running task), waits for
the grace period, then SIGKILLs what is left; the master re-queues the jobs of
killed workers (their leases expire, or the agent's final heartbeat says so).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from nexus.config import Settings

log = logging.getLogger(__name__)

STUCK_KILL_AFTER_SECONDS = 30.0  # a worker stopped for not consuming that ignores SIGTERM this long is killed


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None  # None: inherit the agent's environment
    # SIGKILL reaches the child's whole process group (it runs in a session of its own): a Ray node's
    # processes, which SIGTERM asks `ray start` itself to stop.
    kill_group: bool = False


@dataclass(frozen=True)
class RestartPolicy:
    base_seconds: float = 1.0
    max_seconds: float = 60.0
    reset_after_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "RestartPolicy":
        return cls(settings.agent_restart_backoff_base_seconds, settings.agent_restart_backoff_max_seconds,
                   settings.agent_restart_reset_after_seconds)

    def delay(self, consecutive_crashes: int) -> float:
        """Wait before restart number `consecutive_crashes` (1, 2, 3 …): base, 2·base, 4·base … capped."""
        if consecutive_crashes < 1:
            return 0.0
        return min(self.base_seconds * 2 ** (consecutive_crashes - 1), self.max_seconds)


# --- running them: the I/O edge ------------------------------------------------------


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    crashes: int = 0  # consecutive crashes, reset by a long enough healthy run
    restarts: int = 0
    restart_at: float | None = None
    last_exit_code: int | None = None
    stuck_since: float | None = None  # asked to stop because it was alive but not consuming


@dataclass(frozen=True)
class ChildEvent:
    kind: str  # "started" | "exited" | "killed"
    name: str
    at: float
    pid: int | None = None
    exit_code: int | None = None
    restart_in: float | None = None


def _spawn(spec: ChildSpec) -> subprocess.Popen:
    # A session of its own: a Ctrl-C in the agent's terminal reaches the agent only, which
    # then drains the children in order instead of every process racing to quit.
    return subprocess.Popen(list(spec.argv), env=None if spec.env is None else dict(spec.env),
                            start_new_session=True)


@dataclass
class Supervisor:
    specs: Sequence[ChildSpec]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    spawn: Callable[[ChildSpec], subprocess.Popen] = _spawn
    # pid -> True when that worker is alive but not consuming (nexus.queueing.health.StuckWorkers):
    # it is stopped (SIGTERM, SIGKILL after STUCK_KILL_AFTER_SECONDS) and restarted like a crashed one.
    unhealthy: Callable[[int], bool] | None = None

    def __post_init__(self) -> None:
        self._children = [_Child(spec) for spec in self.specs]
        self._paused = True  # nothing runs until start()
        self.events: list[ChildEvent] = []

    @property
    def running(self) -> bool:
        return not self._paused

    def start(self) -> None:
        """Start every child that is not running (also resumes after `stop`)."""
        self._paused = False
        for child in self._children:
            if child.process is None:
                child.crashes, child.restart_at = 0, None
                self._start(child)

    def poll(self) -> None:
        """Reap children that exited, schedule their restart, start those that are due. Call often."""
        now = self.clock()
        for child in self._children:
            if child.process is not None and child.process.poll() is not None:
                self._on_exit(child, now)
            if child.process is not None and self.unhealthy is not None and not self._paused:
                self._stop_if_stuck(child, now)
            if not self._paused and child.process is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._start(child)

    def stop(self, grace_seconds: float) -> None:
        """Drain: SIGTERM every child (Celery's warm shutdown), wait up to the grace period, SIGKILL the rest."""
        self._paused = True
        self._drain(self._children, grace_seconds)
        for child in self._children:
            child.restart_at = None

    # --- a changing set of children (the model instances placed on the node) -------------

    @property
    def children(self) -> dict[str, ChildSpec]:
        """The specs supervised now, by name."""
        return {child.spec.name: child.spec for child in self._children}

    def add(self, spec: ChildSpec) -> None:
        """Supervise one more child; it starts at once unless the supervisor is stopped."""
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} is supervised already")
        child = _Child(spec)
        self._children.append(child)
        if not self._paused:
            self._start(child)

    def remove(self, names: Sequence[str], grace_seconds: float) -> None:
        """Stop these children as `stop` does (all signalled first, one grace period) and forget them."""
        leaving = [child for child in self._children if child.spec.name in set(names)]
        self._children = [child for child in self._children if child not in leaving]
        self._drain(leaving, grace_seconds)

    def _drain(self, children: Sequence[_Child], grace_seconds: float) -> None:
        live = [child for child in children if child.process is not None]
        for child in live:
            _signal(child.process, signal.SIGTERM)
        deadline = self.clock() + grace_seconds
        for child in live:
            self._wait_or_kill(child, deadline)

    def status(self) -> list[dict]:
        return [
            {
                "name": child.spec.name,
                "pid": None if child.process is None else child.process.pid,
                "running": child.process is not None,
                "restarts": child.restarts,
                "consecutive_crashes": child.crashes,
                "last_exit_code": child.last_exit_code,
            }
            for child in self._children
        ]

    def _start(self, child: _Child) -> None:
        child.process = self.spawn(child.spec)
        child.started_at = self.clock()
        child.restart_at = None
        self._event("started", child, child.started_at, pid=child.process.pid)
        log.info("started %s (pid %s)", child.spec.name, child.process.pid)

    def _stop_if_stuck(self, child: _Child, now: float) -> None:
        if child.stuck_since is None and self.unhealthy(child.process.pid):
            log.error("%s (pid %s) is alive but not consuming: restarting it", child.spec.name, child.process.pid)
            child.stuck_since = now
            _signal(child.process, signal.SIGTERM)
        elif child.stuck_since is not None and now - child.stuck_since > STUCK_KILL_AFTER_SECONDS:
            _kill(child.process, child.spec)

    def _on_exit(self, child: _Child, now: float) -> None:
        code = child.process.returncode
        child.process, child.last_exit_code, child.stuck_since = None, code, None
        if self._paused:
            return
        healthy_run = now - child.started_at >= self.policy.reset_after_seconds
        child.crashes = 1 if healthy_run else child.crashes + 1
        delay = self.policy.delay(child.crashes)
        child.restart_at = now + delay
        self._event("exited", child, now, exit_code=code, restart_in=delay)
        log.warning("%s exited with %s; restarting in %.1fs (crash %d in a row)",
                    child.spec.name, code, delay, child.crashes)

    def _wait_or_kill(self, child: _Child, deadline: float) -> None:
        process = child.process
        try:
            process.wait(timeout=max(0.0, deadline - self.clock()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within the grace period: killing it", child.spec.name)
            _kill(process, child.spec)
            process.wait()
            self._event("killed", child, self.clock(), pid=process.pid)
        child.process, child.last_exit_code = None, process.returncode

    def _event(self, kind: str, child: _Child, at: float, **details) -> None:
        self.events.append(ChildEvent(kind, child.spec.name, at, **details))


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass  # it exited between poll and signal


def _kill(process: subprocess.Popen, spec: ChildSpec) -> None:
    if not spec.kill_group:
        _signal(process, signal.SIGKILL)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        _signal(process, signal.SIGKILL)
