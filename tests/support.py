"""Test support: real servers and real Nexus processes, started once per test session.

Each session gets its own Redis and S3 server (cheap, and isolated from any
other test run on the machine) and its own database on the system PostgreSQL
at 127.0.0.1:5432 (or a PostgreSQL it starts itself when none answers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from nexus.config import Settings

ADMIN_TOKEN = "nx_test-admin-token-" + uuid.uuid4().hex
JOIN_TOKEN = "nxj_test-join-token-" + uuid.uuid4().hex
S3_ACCESS, S3_SECRET = "nexus-test-access", "nexus-test-secret-key"
WORKER_REDIS_PASSWORD = "nexus-test-worker-redis-" + uuid.uuid4().hex
API_REDIS_PASSWORD = "nexus-test-api-redis-" + uuid.uuid4().hex
RECONCILER_REDIS_PASSWORD = "nexus-test-reconciler-redis-" + uuid.uuid4().hex
WORKER_S3_ACCESS, WORKER_S3_SECRET = "nexus-test-worker", "nexus-test-worker-secret-" + uuid.uuid4().hex[:12]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the NEXUS_* variable a child process reads."""
    env = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        env[f"NEXUS_{name.upper()}"] = value.value if hasattr(value, "value") else str(value)
    return env


# Processes of a worker node: they get a worker's settings (its own database role, no master-only secret),
# so every test that runs a job runs it with the restricted credentials.
NODE_COMMANDS = frozenset({"worker", "agent"})


# Master processes with a Redis user of their own: their NEXUS_REDIS_URL names it (as `nexus dev` and compose do).
OWN_REDIS_URL = {"master": "api_redis_url", "reconciler": "reconciler_redis_url"}


def process_env(settings: Settings, args: list[str]) -> dict[str, str]:
    """The NEXUS_* variables of `nexus <args>`: a worker node's own for workers and agents, else the master's
    (the API and the reconciler as their own Redis users)."""
    if args and args[0] in NODE_COMMANDS:
        return settings.worker_environment()
    env = settings_env(settings)
    if args and args[0] in OWN_REDIS_URL:
        env["NEXUS_REDIS_URL"] = getattr(settings, OWN_REDIS_URL[args[0]])
    return env


class NexusProcess:
    """`python -m nexus <args>` with the test settings, its output in a log file."""

    def __init__(self, settings: Settings, args: list[str], log_dir: Path, name: str, extra_env: dict | None = None):
        self.args, self.name = args, name
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        self.env = {**inherited, **process_env(settings, args), **(extra_env or {})}
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "NexusProcess":
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "nexus", *self.args], env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return self

    def wait_for_log(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {needle!r} not seen in {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.process:
            self.process.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def start_worker(settings: Settings, log_dir: Path, name: str | None = None, extra_args: list[str] = (),
                 extra_env: dict | None = None) -> NexusProcess:
    name = name or f"worker-{uuid.uuid4().hex[:6]}"
    worker = NexusProcess(settings, ["worker", "--name", name, *extra_args], log_dir, name,
                          {"NEXUS_NODE_NAME": name, **(extra_env or {})}).start()
    worker.wait_for_log("ready.")
    return worker


def start_api(settings: Settings, log_dir: Path, name: str = "api") -> tuple[NexusProcess, str]:
    api = NexusProcess(settings, ["master", "--workers", "1"], log_dir, name).start()
    url = settings.public_api_url
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return api, url
        except requests.RequestException:
            pass
        if api.process.poll() is not None:
            raise RuntimeError(f"api exited:\n{api.log_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"api not healthy:\n{api.log_text()[-3000:]}")


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
