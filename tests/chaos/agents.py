"""Real node agents for the chaos cluster: `nexus agent` processes with node rows, heartbeats and workers.

The plain `nexus worker` processes of cluster.py have no node row, so nothing about nodes
(stale, offline, quarantine) happens to them. The faults that are about nodes run on agents:
each registers with the join token from a hardware fixture, heartbeats the node API, and
supervises its own Celery worker, as on a real machine.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import requests

from tests.agent_support import FIXTURES
from tests.chaos.cluster import ChaosCluster
from tests.support import ADMIN_TOKEN, NexusProcess, wait_for

HEARTBEAT_SECONDS = 1.0


class AgentNodes:
    """`names` agents on the cpu_only fixture; the plain workers stay stopped while they run."""

    def __init__(self, cluster: ChaosCluster, root: Path, names: list[str], extra_env: dict | None = None):
        self.cluster, self.root, self.names = cluster, root, names
        self.extra_env = extra_env or {}  # {agent name: env}
        self.agents: dict[str, NexusProcess] = {}
        self.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def start(self) -> "AgentNodes":
        self.cluster.stop_plain_workers()
        for name in self.names:
            self.start_agent(name)
        for name in self.names:
            self.wait_working(name)
        return self

    def start_agent(self, name: str) -> NexusProcess:
        env = {"NEXUS_DATA_DIR": str(self.root / name), "NEXUS_NODE_NAME": name,
               "NEXUS_HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT_SECONDS), "NEXUS_AGENT_DRAIN_GRACE_SECONDS": "20",
               **self.extra_env.get(name, {})}
        agent = self.cluster.process(["agent", "--hardware-fixture", str(FIXTURES / "cpu_only.json")], name, env)
        self.agents[name] = agent.start()
        return agent

    def stop(self) -> None:
        for agent in self.agents.values():
            try:
                agent.stop(timeout=40)
            except Exception:  # cleanup goes on; the test's own failure is the one to report
                pass
        self.cluster.plain_workers = True  # the next test's ensure_running starts them again

    # --- the master's view -----------------------------------------------------------------------
    def nodes(self) -> dict[str, dict]:
        """This cluster's agent nodes by name, from the admin API."""
        answer = requests.get(self.cluster.url + "/api/v1/nodes", headers=self.headers, timeout=30).json()
        return {n["name"]: n for n in answer["nodes"] if n["name"] in self.names}

    def node_rows(self) -> dict[str, dict]:
        """The same from PostgreSQL (works while the API is down)."""
        return {r["name"]: r for r in self.cluster.query(
            "SELECT name, state, consecutive_failures FROM nodes WHERE name = ANY(:names)", {"names": self.names})}

    def wait_working(self, name: str, timeout: float = 120) -> dict:
        """Until the node is ready and its worker runs and has said it consumes."""
        def working():
            node = self.nodes().get(name)
            return node if node and node["state"] == "ready" and node["workers"] and \
                all(w["running"] for w in node["workers"]) and self.worker_process(name) else None
        node = wait_for(working, timeout=timeout, interval=0.5, what=f"agent {name} ready with its worker")
        self._wait_worker_log_ready(name)
        return node

    def resume(self, name: str) -> None:
        node = self.nodes()[name]
        response = requests.post(f"{self.cluster.url}/api/v1/nodes/{node['id']}/resume", headers=self.headers,
                                 timeout=30)
        assert response.status_code < 300, response.text

    # --- the agent's worker ------------------------------------------------------------------------
    def worker_process(self, name: str) -> psutil.Process | None:
        """The Celery worker the agent supervises (a `nexus worker` child), if one runs."""
        agent = self.agents[name].process
        try:
            children = psutil.Process(agent.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def kill_worker(self, name: str) -> int:
        """SIGKILL the agent's worker (the agent lives on and restarts it after its backoff); its pid."""
        worker = self.worker_process(name)
        assert worker is not None, f"agent {name} runs no worker"
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        return worker.pid

    def _wait_worker_log_ready(self, name: str, timeout: float = 60) -> None:
        """Celery says "ready." once it consumes; the worker's output goes to the agent's log."""
        agent = self.agents[name]
        deadline = time.monotonic() + timeout
        while "ready." not in agent.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
