"""Does each worker really consume? Each one proves it to itself through the broker.

Celery 5 workers have stayed alive yet stopped taking messages after a Redis
reconnect (celery#8030, #7705), so "the process runs" and "it answers ping"
prove nothing. Every worker therefore consumes one extra queue of its own,
`nexus.probe.<hostname>`, and a thread in the worker's main process sends a
probe message to it every `worker_probe_interval_seconds`. The probe task,
run by the worker's pool like any job, writes its nonce back.

The verdict, kept in a Redis hash per worker (with a TTL, so a dead worker's
record vanishes), is:
    consuming      the last probe was answered
    busy           every slot is taken: the probe waits its turn, no verdict
    not_consuming  a probe has waited *in the queue* longer than
                   `worker_probe_timeout_seconds` while the worker had free slots
A probe lost with the broker's data (not in the queue, never answered) is sent
again and judges nothing. `/healthz` reads the records; the agent's supervisor
restarts a child whose record says not_consuming (`StuckWorkers`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import redis
from celery import Celery
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from nexus.config import Settings
from nexus.queueing.broker import decoded
from nexus.queueing.celery_app import PRIORITY_LEVELS

log = logging.getLogger(__name__)

PROBE_TASK = "nexus.probe"
REGISTRY_KEY = "nexus:workers"  # set of worker hostnames that keep a record
CONSUMING, BUSY, NOT_CONSUMING, UNKNOWN = "consuming", "busy", "not_consuming", "unknown"


def probe_queue(hostname: str) -> str:
    return f"nexus.probe.{hostname}"


def record_key(hostname: str) -> str:
    return f"nexus:worker:{hostname}"


def verdict(probe_waiting_s: float | None, probe_in_queue: bool, answered: bool, saturated: bool,
            timeout: float) -> str:
    """The worker's consumption state from one look at its latest probe (pure: see the module doc)."""
    if answered:
        return CONSUMING
    if saturated:
        return BUSY
    if probe_waiting_s is None or not probe_in_queue or probe_waiting_s <= timeout:
        return UNKNOWN  # nothing sent yet, lost with the broker's data, or not overdue: keep the last verdict
    return NOT_CONSUMING


@dataclass
class _Probe:
    nonce: str
    sent_at: float
    free_since: float  # when the worker last had a free slot while this probe waited


class ConsumptionProbe:
    """The thread inside a worker's main process that sends probes and writes the verdict."""

    def __init__(self, app: Celery, settings: Settings, hostname: str, concurrency: int,
                 active_count: Callable[[], int]):
        self.app, self.settings, self.hostname = app, settings, hostname
        self.concurrency = concurrency
        self.active_count = active_count  # () -> jobs the worker runs right now
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        self.state = UNKNOWN
        self._probe: _Probe | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="consumption-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.srem(REGISTRY_KEY, self.hostname)
            self.redis.delete(record_key(self.hostname), probe_queue(self.hostname))
        except redis.RedisError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.worker_probe_interval_seconds):
            try:
                self.tick()
            except Exception as exc:  # the broker is down: nothing to prove now, try next round
                log.debug("consumption probe skipped: %s", exc)

    def tick(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        timeout = self.settings.worker_probe_timeout_seconds
        saturated = self.active_count() >= self.concurrency
        answered = self._probe is not None and \
            self.redis.hget(record_key(self.hostname), "answered") == self._probe.nonce.encode()
        if self._probe is not None and saturated:
            self._probe.free_since = now  # the wait counts only while a slot is free
        waiting = None if self._probe is None else now - self._probe.free_since
        queued = self._probe is not None and self._queued()
        found = verdict(waiting, queued, answered, saturated, timeout)
        if found != UNKNOWN:
            if found != self.state and found == NOT_CONSUMING:
                log.error("this worker is alive but does not consume: a probe waited %.0fs in %s",
                          waiting, probe_queue(self.hostname))
                self._write(now)
                self._exit_for_restart()
            self.state = found
        lost = waiting is not None and waiting > timeout and not queued  # gone with the broker's data
        if self._probe is None or answered or lost:
            self._send(now)
        self._write(now)
        return self.state

    def _exit_for_restart(self) -> None:
        """Celery cannot be trusted to resume consuming (celery#8030): leave, so a fresh process replaces us.

        SIGTERM is Celery's warm shutdown: running jobs finish, unacknowledged messages
        go back. The agent, `nexus dev` and compose's restart policy start a new worker;
        the master's reconciler covers anything in flight either way.
        """
        if not self.settings.worker_exit_when_not_consuming:
            return
        log.error("shutting down so that a supervisor restarts this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    def _queued(self) -> bool:
        queue = probe_queue(self.hostname)
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        for level in range(1, PRIORITY_LEVELS):
            pipe.llen(f"{queue}:{level}")
        return bool(sum(pipe.execute()) > 0)

    def _send(self, now: float) -> None:
        nonce = uuid.uuid4().hex
        # Expiring: a probe that outlives its round is skipped, not run late.
        self.app.send_task(PROBE_TASK, args=[self.hostname, nonce], queue=probe_queue(self.hostname),
                           expires=self.settings.worker_probe_timeout_seconds * 3, ignore_result=True)
        self._probe = _Probe(nonce, now, now)

    def _write(self, now: float) -> None:
        ttl = int(self.settings.worker_probe_interval_seconds * 3 + self.settings.worker_probe_timeout_seconds) + 1
        key = record_key(self.hostname)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"state": self.state, "pid": os.getpid(), "host": socket.gethostname(),
                                "seen_at": now, "active": self.active_count(), "concurrency": self.concurrency})
        pipe.expire(key, ttl)
        pipe.sadd(REGISTRY_KEY, self.hostname)
        pipe.execute()


def install_consumption_probe(app: Celery, settings: Settings) -> None:
    """Register the probe task and, in a worker, its own probe queue and the probing thread."""
    answers: list[redis.Redis] = []

    # No task events: a probe every few seconds per worker would bury the jobs in Flower's task list.
    @app.task(name=PROBE_TASK, ignore_result=True, acks_late=False, send_events=False)
    def probe(hostname: str, nonce: str) -> None:
        if not answers:
            answers.append(redis.Redis.from_url(settings.redis_url, socket_timeout=5))
        answers[0].hset(record_key(hostname), "answered", nonce)

    probes: list[ConsumptionProbe] = []

    @celeryd_after_setup.connect(weak=False)
    def add_probe_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
        if instance is not None and instance.app is app:
            instance.app.amqp.queues.select_add(probe_queue(sender))
            for name in ("celery.worker.strategy", "celery.app.trace"):  # "received" / "succeeded" lines
                logging.getLogger(name).addFilter(_quiet_probes)
            probes.append(ConsumptionProbe(app, settings, sender, instance.concurrency, _active_count))

    @worker_ready.connect(weak=False)
    def start_probing(sender: Any = None, **_: Any) -> None:
        if probes and getattr(sender, "app", None) is app:
            probes[0].start()

    @worker_shutdown.connect(weak=False)
    def stop_probing(**_: Any) -> None:
        for running in probes:
            running.stop()


def _quiet_probes(record: logging.LogRecord) -> bool:
    """Keep a probe every few seconds out of the worker's log (its failures still show: they are errors)."""
    return record.levelno > logging.INFO or f"{PROBE_TASK}[" not in record.getMessage()


def _active_count() -> int:
    from celery.worker import state

    return len(state.active_requests)


# --- reading the records: /healthz and the agent's supervisor -------------------------------


def worker_records(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's record; names whose record expired (dead workers) are forgotten."""
    names = sorted(decoded(n) for n in client.smembers(REGISTRY_KEY))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(record_key(name))
    records, gone = [], []
    for name, raw in zip(names, pipe.execute()):
        if not raw:
            gone.append(name)
            continue
        record = {decoded(k): decoded(v) for k, v in raw.items()}
        records.append({"name": name, "state": record.get("state", UNKNOWN), "pid": int(record.get("pid", 0)),
                        "host": record.get("host"), "seen_at": float(record.get("seen_at", 0)),
                        "active": int(record.get("active", 0)), "concurrency": int(record.get("concurrency", 0))})
    if gone:
        client.srem(REGISTRY_KEY, *gone)
    return records


def workers_summary(client: redis.Redis) -> dict[str, Any]:
    """For /healthz: ok unless a live worker is known not to consume."""
    records = worker_records(client)
    stuck = [r["name"] for r in records if r["state"] == NOT_CONSUMING]
    counts = {state: sum(r["state"] == state for r in records) for state in (CONSUMING, BUSY, UNKNOWN)}
    return {"ok": not stuck, "total": len(records), **counts, "not_consuming": stuck}


class CachedSummary:
    """`/healthz` stays fast under load balancer polling: the Redis reads happen once per `ttl` seconds."""

    def __init__(self, ttl: float = 3.0):
        self.ttl = ttl
        self._at = 0.0
        self._value: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def get(self, client: redis.Redis) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._at > self.ttl:
                self._value, self._at = workers_summary(client), time.monotonic()
            return self._value


class StuckWorkers:
    """The supervisor's hook: is the child with this pid alive but not consuming? (read at most every `every` s)"""

    def __init__(self, client: redis.Redis, every: float = 5.0):
        self.client, self.every = client, every
        self._at, self._stuck_pids = 0.0, frozenset[int]()

    @classmethod
    def for_settings(cls, settings: Settings) -> "StuckWorkers":
        return cls(redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3),
                   every=settings.worker_probe_interval_seconds)

    def __call__(self, pid: int) -> bool:
        if time.monotonic() - self._at > self.every:
            self._at = time.monotonic()
            try:
                host = socket.gethostname()
                self._stuck_pids = frozenset(r["pid"] for r in worker_records(self.client)
                                             if r["state"] == NOT_CONSUMING and r["host"] == host)
            except redis.RedisError:
                self._stuck_pids = frozenset()  # the broker is down: no verdict, restart nothing
        return pid in self._stuck_pids

