"""Flower as a user sees it, in a real headless Chromium, on a `nexus dev` cluster whose workers the agent started.

Logged in with basic auth, the Workers page lists the agent's worker, the Tasks page shows the
`nexus.run_job` run of a job just submitted with its job id readable, and the Broker page lists the
tier queue with its length. No process of the cluster carries a secret on its command line.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from nexus.localservers import RedisServer, free_port
from tests.browser_support import headless_chromium
from tests.support import wait_for

pytestmark = pytest.mark.timeout(300)

REDIS_PASSWORD = "flower-test-broker-password-" + os.urandom(6).hex()


@pytest.fixture
def dev_cluster(tmp_path):
    """`nexus dev -n 1 --no-model` on a password-protected Redis; yields cluster.json's contents."""
    data_dir = tmp_path / "cluster"
    with RedisServer(tmp_path / "redis", password=REDIS_PASSWORD) as redis_server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        env.update(NEXUS_API_PORT=str(free_port()), NEXUS_FLOWER_PORT=str(free_port()),
                   NEXUS_REDIS_URL=redis_server.url)
        launcher = subprocess.Popen([sys.executable, "-m", "nexus", "dev", "-n", "1", "--no-model", "--data-dir",
                                     str(data_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        try:
            wait_for((data_dir / "cluster.json").exists, timeout=240, interval=0.5, what="cluster.json")
            yield json.loads((data_dir / "cluster.json").read_text())
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.communicate(timeout=90)


def test_flower_shows_the_cluster_in_a_browser(dev_cluster):
    cluster = dev_cluster
    headers = {"Authorization": f"Bearer {cluster['admin_token']}"}
    job = requests.post(cluster["api_url"] + "/api/v1/jobs?wait=30", json={"type": "noop", "payload": {"echo": 1}},
                        headers=headers, timeout=40).json()
    assert job["state"] == "succeeded", job

    flower, auth = cluster["flower_url"], (cluster["flower_user"], cluster["flower_password"])
    wait_for(lambda: _status(flower + "/api/workers") == 401, timeout=60, what="Flower up, behind basic auth")
    # The run shows once the worker's task events reached Flower.
    wait_for(lambda: job["id"] in requests.get(flower + "/api/tasks", auth=auth, timeout=10).text, timeout=60,
             what="the job's run in Flower")
    wait_for(lambda: "cpu_only" in requests.get(flower + "/broker", auth=auth, timeout=10).text, timeout=60,
             what="the cpu_only queue on Flower's broker page")

    with headless_chromium() as browser:
        credentials = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}})

        browser.get(flower + "/workers")
        worker_rows = _rows(browser, "workers-table", lambda rows: any("cpu." in r for r in rows))
        assert any("online" in r.lower() for r in worker_rows if "cpu." in r), worker_rows

        browser.get(flower + "/tasks")
        task_rows = _rows(browser, "tasks-table", lambda rows: any(job["id"] in r for r in rows))
        [run] = [r for r in task_rows if job["id"] in r]
        assert "nexus.run_job" in run and "SUCCESS" in run

        browser.get(flower + "/broker")
        queues = {r.split()[0]: r.split()[1] for r in _rows(browser, "queue-table", lambda rows: rows)}
        assert queues.get("cpu_only") == "0", queues  # its one job ran: nothing waits

    secrets = [REDIS_PASSWORD, cluster["flower_password"], cluster["admin_token"], cluster["join_token"],
               cluster["s3_secret_key"]]
    exposed = [line for line in _command_lines() for secret in secrets if secret in line]
    assert exposed == [], "a secret on a command line"


def _rows(browser, table_id: str, ready, timeout: float = 60) -> list[str]:
    """The text of each body row of the table once `ready(rows)` holds (pages fill tables by script)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def rows():
        try:
            found = [r.text for r in browser.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]
        except StaleElementReferenceException:  # Flower redrew the table between finding a row and reading it
            return None
        return found if found and ready(found) else None

    return wait_for(rows, timeout=timeout, interval=0.5, what=f"rows in #{table_id}")


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


def _command_lines() -> list[str]:
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                lines.append(handle.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return lines
