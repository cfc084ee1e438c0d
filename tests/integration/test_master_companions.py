"""`nexus master --reconciler --flower --node-api-in-process` (what `nexus dev` runs): the reconciler, Flower and
the node API live in the master's watching process, and a stalled user API stalls neither the reconciler nor
the node API."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from nexus.jobs import lifecycle
from nexus.localservers import free_port
from nexus.agent.heartbeat import registration_body
from tests.agent_support import hardware
from tests.support import NexusProcess, wait_for

pytestmark = pytest.mark.timeout(180)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            found += children
            todo += children
    return found


def _nice_of_threads(pid: int) -> set[int]:
    """The nice values of a process's threads (on Linux each thread has its own)."""
    return {int(stat.read_text().rsplit(")", 1)[1].split()[16])
            for stat in Path(f"/proc/{pid}/task").glob("*/stat")}


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_the_reconciler_works_on_while_the_user_api_is_stalled(settings, services, session_dir):
    settings = settings.model_copy(update={"api_port": free_port(), "node_api_port": free_port(),
                                           "flower_port": free_port()})
    master = NexusProcess(settings, ["master", "--workers", "1", "--reconciler", "--flower", "--node-api-in-process"],
                          session_dir, "master-companions").start()
    stalled: list[int] = []
    try:
        master.wait_for_log("reconciler running")
        api, node_api = settings.public_api_url, f"http://127.0.0.1:{settings.node_api_port}"
        wait_for(lambda: _status(api + "/healthz") == 200, timeout=60, what="the user API")
        flower = f"http://127.0.0.1:{settings.flower_port}/api/workers"
        wait_for(lambda: _status(flower) == 401, timeout=60, what="Flower, behind basic auth")
        assert _status(flower, auth=(settings.flower_user, settings.flower_password)) == 200

        # The node API is no gunicorn of its own: the user API's arbiter and worker are the only children.
        children = _descendants(master.process.pid)
        assert not any("create_node_wsgi_app" in _cmdline(pid) for pid in children)
        # The whole user API stalls (its arbiter and its worker, frozen).
        stalled = [pid for pid in children if "nexus.api.green" in _cmdline(pid)]
        assert len(stalled) == 2, [_cmdline(p) for p in children]
        # Under a CPU-saturating burst the user API yields to the watcher (reconciler, node API): every
        # thread of its arbiter and worker runs settings.api_nice above the watcher's threads.
        base = os.getpriority(os.PRIO_PROCESS, master.process.pid)
        assert _nice_of_threads(master.process.pid) == {base}
        for pid in stalled:
            assert _nice_of_threads(pid) == {min(19, base + settings.api_nice)}, _cmdline(pid)
        for pid in stalled:
            os.kill(pid, signal.SIGSTOP)
        with pytest.raises(requests.RequestException):
            requests.get(api + "/healthz", timeout=1)

        # A running job whose worker stopped renewing its lease: the reconciler still expires it ...
        [(row, _)] = services.submitter.submit_many([{"type": "noop", "requirements": {"tier": "gpu_peer"}}],
                                                    tenant="default")
        with services.engine.begin() as conn:
            assert lifecycle.claim(conn, row.id, 1, "gone-node", 30)
            conn.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                         {"id": row.id})
        wait_for(lambda: _state(services, row.id) == "retrying", timeout=20, what="the lease expired")
        # ... and the node API answers, registration included.
        assert _status(node_api + "/healthz") == 200
        body = registration_body(hardware("cpu_only"), "lane-node", ["cpu_only"])
        registered = requests.post(node_api + "/api/v1/nodes/register", json=body,
                                   headers={"Authorization": f"Bearer {settings.join_token}"}, timeout=10)
        assert registered.status_code == 201, registered.text
    finally:
        for pid in stalled:
            os.kill(pid, signal.SIGCONT)
        master.stop()


def test_the_reconciler_is_off_unless_asked(settings, session_dir):
    """Plain `nexus master` (the tests' clusters, compose's api service) runs no reconciler of its own."""
    settings = settings.model_copy(update={"api_port": free_port(), "node_api_port": free_port()})
    master = NexusProcess(settings, ["master", "--workers", "1"], session_dir, "master-plain").start()
    try:
        wait_for(lambda: _status(settings.public_api_url + "/healthz") == 200, timeout=60, what="the user API")
        assert "reconciler running" not in master.log_text()
    finally:
        master.stop()


def _status(url: str, **kwargs) -> int | None:
    try:
        return requests.get(url, timeout=3, **kwargs).status_code
    except requests.RequestException:
        return None


def _state(services, job_id) -> str:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
