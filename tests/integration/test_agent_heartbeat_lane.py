"""Heartbeats cannot be starved by user traffic: the real `nexus master` (two gunicorns) under a
long-poll flood from one submitter token, with the agent's own HTTP client."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from nexus.agent.heartbeat import heartbeat_body, registration_body
from nexus.agent.master import MasterClient
from tests.agent_support import hardware

pytestmark = pytest.mark.timeout(120)

FLOOD = 32  # as many long-polls as held every thread of the threaded user API twice over
POLL_SECONDS = 4.0


def _flood(url: str, token: str, job_id: str, count: int) -> list[threading.Thread]:
    """`count` long-polls on a job that never finishes: each holds a request thread POLL_SECONDS."""
    def poll():
        requests.get(f"{url}/api/v1/jobs/{job_id}?wait={POLL_SECONDS}", headers={"Authorization": f"Bearer {token}"},
                     timeout=60)

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_heartbeats_answer_quickly_during_a_long_poll_flood(settings, services, live_api):
    url, admin = live_api
    headers = {"Authorization": f"Bearer {admin}"}
    token = requests.post(f"{url}/api/v1/tokens", json={"name": "flooder", "role": "submitter"}, headers=headers,
                          timeout=10).json()["token"]
    job = requests.post(f"{url}/api/v1/jobs", json={"type": "noop", "requirements": {"tier": "gpu_peer"}},
                        headers={"Authorization": f"Bearer {token}"}, timeout=10).json()  # nobody consumes gpu_peer
    client = MasterClient.for_settings(settings)  # as the agent builds it
    identity = client.register(settings.join_token, registration_body(hardware("rtx4090"), "flooded", ["gpu_peer"]))

    polls = _flood(url, token, job["id"], FLOOD)
    time.sleep(0.5)
    # The user API is on gevent: the held long-polls are greenlets, so even it still answers.
    assert requests.get(f"{url}/healthz", timeout=1.5).status_code == 200
    latencies = []
    for _ in range(5):
        body = heartbeat_body(hardware("rtx4090"), state="ready", running_jobs=[], loaded_models=[], workers=[],
                              cpu_percent=1.0, sent_at=time.time())
        started = time.perf_counter()
        assert client.heartbeat(identity, body).state == "ready"
        latencies.append(time.perf_counter() - started)
    assert max(latencies) < 1.0, latencies
    for poll in polls:
        poll.join(30)


def test_the_node_api_serves_no_user_routes(settings, services, live_api):
    """A user request sent to the node API's port is refused, so it cannot hold the beats' threads."""
    node_api = MasterClient.for_settings(settings).send_to
    assert node_api != live_api[0]
    answer = requests.get(f"{node_api}/api/v1/jobs/00000000-0000-0000-0000-000000000000?wait=30",
                          headers={"Authorization": f"Bearer {live_api[1]}"}, timeout=5)
    assert answer.status_code == 404 and "error" in answer.json()
    assert requests.get(f"{node_api}/healthz", timeout=5).status_code == 200
