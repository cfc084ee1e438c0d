"""`nexus dev`: the one-command local cluster really starts, serves a job, guards Flower and stops cleanly."""

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


def test_nexus_dev_starts_a_working_cluster_and_stops_everything(tmp_path):
    data_dir = tmp_path / "cluster"
    api_port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_API_PORT=str(api_port), NEXUS_FLOWER_PORT=str(flower_port))
    launcher = subprocess.Popen([sys.executable, "-m", "nexus", "dev", "-n", "1", "--no-model", "--data-dir", str(data_dir)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        cluster_file = data_dir / "cluster.json"
        wait_for(cluster_file.exists, timeout=150, interval=0.5, what="cluster.json")
        cluster = json.loads(cluster_file.read_text())
        assert {"api_url", "admin_token", "database_url", "redis_url", "s3_endpoint", "flower_url"} <= set(cluster)
        headers = {"Authorization": f"Bearer {cluster['admin_token']}"}
        job = requests.post(cluster["api_url"] + "/api/v1/jobs", json={"type": "noop", "payload": {"echo": 1}},
                            headers=headers, timeout=10).json()
        done = requests.get(f"{cluster['api_url']}/api/v1/jobs/{job['id']}", params={"wait": 30}, headers=headers,
                            timeout=40).json()
        assert done["state"] == "succeeded" and done["result"] == {"echo": 1}

        flower = cluster["flower_url"] + "/api/workers"
        wait_for(lambda: _answers(flower), timeout=60, what="flower up")
        assert requests.get(flower, timeout=10).status_code == 401
        auth = (cluster["flower_user"], cluster["flower_password"])
        assert requests.get(flower, auth=auth, timeout=10).status_code == 200
    finally:
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=90)
    assert launcher.returncode == 0, output[-3000:]
    assert "stopped." in output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2)
    leftovers = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "processes of the cluster still running"


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.RequestException:
        return False
