"""`nexus dev -n 3` registers three CPU nodes, and the node CLI works against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from nexus.localservers import free_port
from tests.support import wait_for

pytestmark = pytest.mark.timeout(240)


def nexus_cli(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "nexus", *args], env={**env, "COLUMNS": "200"}, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dev_cluster_shows_three_cpu_nodes_and_drains_one(tmp_path):
    data_dir = tmp_path / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_API_PORT=str(free_port()), NEXUS_FLOWER_PORT=str(free_port()), NEXUS_HEARTBEAT_INTERVAL_SECONDS="1",
               NEXUS_CLUSTER_FILE=str(data_dir / "cluster.json"))
    launcher = subprocess.Popen([sys.executable, "-m", "nexus", "dev", "-n", "3", "--no-model", "--data-dir",
                                 str(data_dir)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        wait_for((data_dir / "cluster.json").exists, timeout=150, interval=0.5, what="cluster.json")
        cluster = json.loads((data_dir / "cluster.json").read_text())
        headers = {"Authorization": f"Bearer {cluster['admin_token']}"}

        def ready_nodes():
            nodes = requests.get(cluster["api_url"] + "/api/v1/nodes", headers=headers, timeout=10).json()["nodes"]
            return sorted(n["name"] for n in nodes if n["state"] == "ready" and n["tier"] == "cpu_only")

        wait_for(lambda: len(ready_nodes()) == 3, timeout=90, interval=0.5, what="three ready nodes")
        assert ready_nodes() == ["dev-worker-1", "dev-worker-2", "dev-worker-3"]
        status = nexus_cli(env, "status")
        assert "3 ready" in status and status.count("dev-worker-") == 3 and "cpu_only" in status
        assert "now draining" in nexus_cli(env, "node", "drain", "dev-worker-2")
        drained = nexus_cli(env, "nodes", "--state", "draining")
        assert "dev-worker-2" in drained and "dev-worker-1" not in drained
        assert "now ready" in nexus_cli(env, "node", "resume", "dev-worker-2")
        for node in ("dev-worker-1", "dev-worker-2", "dev-worker-3"):  # each agent has its own identity
            assert (data_dir / "nodes" / node / "agent" / "node.json").exists()
    finally:
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=90)
    assert launcher.returncode == 0 and "stopped." in output, output[-3000:]
