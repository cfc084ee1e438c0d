"""A whole Nexus cluster of its own for fault injection: servers and processes this test run started.

Nothing here touches the system PostgreSQL or Redis, or any process it did not
start: PostgreSQL, Redis and S3 run from the package registries' binaries with
their data in a temporary folder, and the API, the reconciler and the workers
are `python -m nexus ...` children. Every fault is applied to one of them.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import requests
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from nexus.config import Settings
from nexus.db.engine import dispose_engines
from nexus.credentials import WORKER_REDIS_USER, worker_redis_acl
from nexus.localservers import PostgresServer, RedisServer, S3Server, free_port
from nexus.localservers.s3 import ScopedKey
from nexus.master import prepare_master
from nexus.services import Services
from tests.support import (ADMIN_TOKEN, JOIN_TOKEN, S3_ACCESS, S3_SECRET, WORKER_REDIS_PASSWORD, WORKER_S3_ACCESS,
                           WORKER_S3_SECRET, NexusProcess, wait_for)

WORKER_REDIS_USERS = {WORKER_REDIS_USER: worker_redis_acl(WORKER_REDIS_PASSWORD)}

TIER = "cpu_only"  # every chaos worker consumes the same queue, so any of them can finish any job
# Node liveness, scaled down so that an outage outlasts it within a short test. Only agents have node
# rows (the plain `nexus worker` processes do not heartbeat): these apply to tests/chaos/agents.py.
NODE_STALE_AFTER_SECONDS = 4.0
NODE_OFFLINE_AFTER_SECONDS = 10.0
NODE_QUARANTINE_AFTER_FAILURES = 3


class ChaosCluster:
    """PostgreSQL, Redis, S3, the API, the reconciler and `worker_count` workers, each restartable."""

    def __init__(self, root: Path, worker_count: int = 3):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.worker_names = [f"chaos-w{i}" for i in range(1, worker_count + 1)]
        self.postgres = PostgresServer(root / "postgres")
        self.redis = RedisServer(root / "redis", users=WORKER_REDIS_USERS)
        # Workers hold a worker's credentials here too (their own database role, Redis user and S3 key).
        self.s3 = S3Server(root / "s3", access_key=S3_ACCESS, secret_key=S3_SECRET,
                           scoped_keys=[ScopedKey("nexus-worker", WORKER_S3_ACCESS, WORKER_S3_SECRET,
                                                  Settings().worker_bucket_actions())])
        self.settings: Settings | None = None
        self.services: Services | None = None
        self.api: NexusProcess | None = None
        self.reconciler: NexusProcess | None = None
        self.workers: dict[str, NexusProcess] = {}
        self.plain_workers = True  # False while agents do the work (tests/chaos/agents.py): not restarted
        self._redis_generation = 0

    # --- start and stop ---------------------------------------------------------------------
    def start(self) -> "ChaosCluster":
        for server in (self.postgres, self.redis, self.s3):
            server.start()
        self.settings = Settings(
            database_url=self.postgres.url_for("nexus"), redis_url=self.redis.url, s3_endpoint=self.s3.endpoint,
            s3_access_key=S3_ACCESS, s3_secret_key=S3_SECRET, admin_token=ADMIN_TOKEN, join_token=JOIN_TOKEN,
            worker_redis_password=WORKER_REDIS_PASSWORD, worker_s3_access_key=WORKER_S3_ACCESS,
            worker_s3_secret_key=WORKER_S3_SECRET,
            api_port=free_port(), node_api_port=free_port(), data_dir=self.root / "data", cluster_file=self.root / "cluster.json",
            job_lease_seconds=3.0, job_heartbeat_seconds=0.5, retry_backoff_base_seconds=0.2,
            retry_backoff_max_seconds=1.0, reconcile_interval_seconds=0.5,
            worker_send_events=False, worker_tier=TIER, worker_concurrency=4,
            worker_probe_interval_seconds=1.0, worker_probe_timeout_seconds=4.0,
            node_stale_after_seconds=NODE_STALE_AFTER_SECONDS, node_offline_after_seconds=NODE_OFFLINE_AFTER_SECONDS,
            node_quarantine_after_failures=NODE_QUARANTINE_AFTER_FAILURES,
        )
        prepare_master(self.settings)
        self.services = Services(self.settings)
        self.start_api()
        self.start_reconciler()
        for name in self.worker_names:
            self.start_worker(name, wait=False)
        for name in self.worker_names:
            self.workers[name].wait_for_log("ready.")
        return self

    def stop(self) -> None:
        """Stop everything this cluster started, children first; each step runs even if one fails."""
        for process in [*self.workers.values(), self.reconciler, self.api]:
            if process is not None:
                _quietly(process.stop, 10)
        if self.services is not None:
            _quietly(self.services.engine.dispose)
        _quietly(dispose_engines)
        for server in (self.s3, self.redis, self.postgres):
            _quietly(server.stop)

    # --- processes ----------------------------------------------------------------------------
    def process(self, args: list[str], name: str, extra_env: dict | None = None) -> NexusProcess:
        return NexusProcess(self.settings, args, self.logs, name, extra_env)

    def start_api(self) -> None:
        self.api = self.process(["master", "--workers", "1"], "api").start()
        wait_for(lambda: self.api_healthy() or self._exited(self.api), timeout=60, interval=0.2, what="API healthy")
        self._check_alive(self.api)

    def start_reconciler(self) -> None:
        self.reconciler = self.process(["reconciler"], "reconciler").start()

    def start_worker(self, name: str, wait: bool = True) -> NexusProcess:
        worker = self.process(["worker", "--name", name], name, {"NEXUS_NODE_NAME": name}).start()
        self.workers[name] = worker
        if wait:
            worker.wait_for_log("ready.")
        return worker

    def stop_plain_workers(self) -> None:
        """Stop the `nexus worker` processes (warm shutdown) until `ensure_running` is allowed them again."""
        self.plain_workers = False
        for name in self.worker_names:
            if name in self.workers:
                self.workers[name].stop(30)

    def kill_worker(self, name: str, signum: int = signal.SIGKILL) -> None:
        self.workers[name].signal(signum)
        if signum == signal.SIGKILL:
            self.workers[name].process.wait(10)

    def ensure_running(self) -> None:
        """Before each test: every server answers and every Nexus process runs (a test may have left one down)."""
        for server in (self.postgres, self.redis, self.s3):
            if not server.is_running():
                server.start()
        if self._exited(self.api) or not self.api_healthy():
            self.api.kill()
            self.start_api()
        if self._exited(self.reconciler):
            self.start_reconciler()
        for name in self.worker_names if self.plain_workers else ():
            worker = self.workers.get(name)
            if worker is None or self._exited(worker):
                self.start_worker(name)
            else:
                worker.signal(signal.SIGCONT)  # a frozen worker from an aborted test

    # --- server faults ---------------------------------------------------------------------------
    def restart_redis(self, empty: bool = False) -> None:
        """Restart the broker on the same port; `empty` replaces it by a fresh server with no data at all."""
        port = self.redis.port
        if empty:
            self.redis.kill()  # a crash: nothing is flushed
            self._redis_generation += 1
            data_dir = self.root / f"redis-{self._redis_generation}"
            shutil.rmtree(data_dir, ignore_errors=True)
            self.redis = RedisServer(data_dir, port, users=WORKER_REDIS_USERS)
        else:
            self.redis.stop()
        self.redis.start()

    def restart_postgres(self) -> None:
        """A fast shutdown (open transactions roll back, connections are cut) and a start on the same data."""
        self.postgres.stop()
        self.postgres.start()

    # --- looking at it ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.settings.public_api_url

    def healthz(self) -> dict:
        return requests.get(self.url + "/healthz", timeout=5).json()

    def api_healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, sql: str, params: dict | None = None, timeout: float = 60) -> list:
        """Rows of a read, riding out a database restart (a stale pooled connection fails once)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.services.engine.connect() as conn:
                    return list(conn.execute(text(sql), params or {}).mappings())
            except OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def running_on(self, node: str, tenant: str) -> list:
        return [r["id"] for r in self.query(
            "SELECT id FROM jobs WHERE state = 'running' AND node = :node AND tenant = :tenant",
            {"node": node, "tenant": tenant})]

    @staticmethod
    def _exited(process: NexusProcess | None) -> bool:
        return process is None or process.process is None or process.process.poll() is not None

    @staticmethod
    def _check_alive(process: NexusProcess) -> None:
        if process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}:\n"
                               f"{process.log_text()[-3000:]}")


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # cleanup goes on; the test's own failure (if any) is the one to report
        pass
