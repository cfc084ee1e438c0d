"""A real `nexus agent` process against a real API: register, run a job on its supervised worker,
drain and resume, restart with the stored token, shut down cleanly, and stop when removed."""

from __future__ import annotations

import signal

import pytest
import requests

from tests.agent_support import FIXTURES
from tests.support import NexusProcess, wait_for

pytestmark = pytest.mark.timeout(180)

NAME = "agent-under-test"


@pytest.fixture
def agent_env(tmp_path):
    return {"NEXUS_DATA_DIR": str(tmp_path / "node"), "NEXUS_HEARTBEAT_INTERVAL_SECONDS": "0.3",
            "NEXUS_AGENT_DRAIN_GRACE_SECONDS": "2", "NEXUS_NODE_NAME": NAME}


def start_agent(settings, tmp_path, env, log_name="agent") -> NexusProcess:
    # An RTX 3060 from the fixtures: one gpu_infra worker, a queue no other test worker consumes.
    return NexusProcess(settings, ["agent", "--hardware-fixture", str(FIXTURES / "rtx3060.json")], tmp_path,
                        log_name, env).start()


class Api:
    def __init__(self, url, token):
        self.url, self.headers = url, {"Authorization": f"Bearer {token}"}

    def __call__(self, method, path, **kw):
        response = requests.request(method, self.url + path, headers=self.headers, timeout=30, **kw)
        assert response.status_code < 300, response.text
        return response.json()

    def node(self):
        nodes = self("GET", "/api/v1/nodes", params={"state": None})["nodes"]
        return next((n for n in nodes if n["name"] == NAME), None)

    def workers_running(self) -> bool:
        node = self.node()
        return bool(node and node["workers"] and all(w["running"] for w in node["workers"]))

    def run_job(self, timeout=60) -> dict:
        job = self("POST", "/api/v1/jobs", json={"type": "noop", "payload": {"echo": 1},
                                                  "requirements": {"tier": "gpu_infra"}})
        return self("GET", f"/api/v1/jobs/{job['id']}", params={"wait": min(timeout, 30)})


def test_agent_lifecycle(settings, live_api, reconciler, tmp_path, agent_env, services):
    api = Api(*live_api)
    agent = start_agent(settings, tmp_path, agent_env)
    try:
        node = wait_for(lambda: (n := api.node()) and n["state"] == "ready" and n, timeout=60, what="registration")
        # Its tier's queue and its own: a job pinned to the node (a benchmark's part) reaches it.
        assert node["tier"] == "gpu_infra" and node["queues"] == ["gpu_infra", f"node.{NAME}"]
        wait_for(api.workers_running, timeout=60, what="the supervised worker")
        done = api.run_job()
        assert done["state"] == "succeeded" and done["node"] == NAME, agent.log_text()[-3000:]
        pinned = api("POST", "/api/v1/jobs", json={"type": "noop", "requirements": {"node": NAME}})
        assert pinned["queue"] == f"node.{NAME}"
        assert api("GET", f"/api/v1/jobs/{pinned['id']}", params={"wait": 30})["node"] == NAME
        sleeper = api("POST", "/api/v1/jobs", json={"type": "sleep", "payload": {"seconds": 3},
                                                     "requirements": {"tier": "gpu_infra"}})
        wait_for(lambda: sleeper["id"] in api.node()["running_jobs"], timeout=20, what="the job in a heartbeat")
        assert api("GET", f"/api/v1/jobs/{sleeper['id']}", params={"wait": 20})["state"] == "succeeded"
        wait_for(lambda: api.node()["running_jobs"] == [], timeout=10, what="the finished job off the heartbeat")

        api("POST", f"/api/v1/nodes/{node['id']}/drain")
        wait_for(lambda: not api.workers_running(), timeout=30, what="workers stopped by the drain")
        waiting = api("POST", "/api/v1/jobs", json={"type": "noop", "requirements": {"tier": "gpu_infra"}})
        api("POST", f"/api/v1/nodes/{node['id']}/resume")
        finished = api("GET", f"/api/v1/jobs/{waiting['id']}", params={"wait": 30})
        if finished["state"] != "succeeded":
            finished = api("GET", f"/api/v1/jobs/{waiting['id']}", params={"wait": 30})
        assert finished["state"] == "succeeded" and finished["node"] == NAME

        # SIGTERM mid-job: the worker gets the grace period, is killed, and the job is re-queued at once.
        long = api("POST", "/api/v1/jobs", json={"type": "sleep", "payload": {"seconds": 60},
                                                  "requirements": {"tier": "gpu_infra"}})
        wait_for(lambda: api("GET", f"/api/v1/jobs/{long['id']}")["state"] == "running", timeout=20, what="running")
        agent.signal(signal.SIGTERM)
        assert agent.process.wait(30) == 0
        assert api.node()["state"] == "offline"  # its last word: stopped
        requeued = wait_for(lambda: (j := api("GET", f"/api/v1/jobs/{long['id']}"))["state"] == "retrying" and j,
                            timeout=15, what="the killed job re-queued")
        assert requeued["attempt"] == 1 and NAME in requeued["error"]
        api("POST", f"/api/v1/jobs/{long['id']}/cancel")

        agent = start_agent(settings, tmp_path, agent_env, "agent-restarted")
        again = wait_for(lambda: (n := api.node()) and n["state"] == "ready" and n, timeout=60, what="restart")
        assert again["id"] == node["id"]  # the stored node token was re-used, no second node
        assert "re-using the node token" in agent.log_text()

        api("DELETE", f"/api/v1/nodes/{node['id']}")
        assert agent.process.wait(40) == 3  # the revoked token stops the node
    finally:
        agent.stop(timeout=20)


def test_max_concurrent_restarts_a_cpu_nodes_worker(settings, live_api, tmp_path, agent_env):
    api = Api(*live_api)
    env = {**agent_env, "NEXUS_WORKER_POOL": "threads", "NEXUS_WORKER_CONCURRENCY": "2"}
    agent = NexusProcess(settings, ["agent", "--hardware-fixture", str(FIXTURES / "cpu_only.json")], tmp_path,
                         "cpu-agent", env).start()
    try:
        wait_for(lambda: "concurrency: 2 (thread)" in agent.log_text(), timeout=60, what="the first worker")
        node = wait_for(lambda: api.workers_running() and api.node(), timeout=30, what="a running CPU worker")
        first_pid = node["workers"][0]["pid"]
        api("PATCH", f"/api/v1/nodes/{node['id']}", json={"max_concurrent": 3})
        wait_for(lambda: api.workers_running() and api.node()["workers"][0]["pid"] != first_pid, timeout=60,
                 what="the worker restarted")
        wait_for(lambda: "concurrency: 3 (thread)" in agent.log_text(), timeout=30, what="the new concurrency")
    finally:
        agent.stop(timeout=20)
