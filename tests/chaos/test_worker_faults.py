"""Workers die, freeze and drain while a stream of jobs runs: nothing is lost, nothing completes twice."""

from __future__ import annotations

import itertools
import signal
import time

import pytest
import requests

from tests.chaos.audit import FINAL, audit, events_with, wait_all_final
from tests.chaos.faults import fault_points, new_tenant, seconds_until_final, summary, wait_running_on, wait_submitted
from tests.agent_support import FIXTURES
from tests.chaos.stream import JobStream, plan_jobs
from tests.support import ADMIN_TOKEN, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def test_workers_sigkilled_again_and_again(cluster, profile, report):
    tenant = new_tenant("sigkill")
    # Slow enough that the stream outlasts the kills (a worker needs a few seconds to come back).
    stream = JobStream(cluster.url, tenant, plan_jobs(profile.jobs, seed=1),
                       per_second=profile.jobs / (profile.kills * 1.2)).start()
    kills, mid_job, recoveries = 0, 0, []
    victims = itertools.cycle(cluster.worker_names)
    wait_submitted(stream, 20)
    while kills < profile.kills:
        victim = next(victims)
        running = wait_running_on(cluster, victim, tenant, timeout=4)
        killed_at = time.time()
        cluster.kill_worker(victim)
        cluster.start_worker(victim, wait=False)  # as a supervisor would
        kills += 1
        mid_job += bool(running)
        recoveries.append((running, killed_at))
    stream.join()
    settle = wait_all_final(cluster, tenant, profile.jobs)
    redone = [seconds_until_final(cluster, ids, at) for ids, at in recoveries]
    result = report(audit(cluster, stream, f"sigkill x{kills} ({mid_job} mid-job)", settle,
                          {"killed_jobs_redone_s": summary(redone)}))
    assert mid_job >= kills // 2, "most kills should hit a worker while it runs jobs"
    expired = events_with(cluster, tenant, "lease expired")
    assert expired and {e["node"] for e in expired} <= set(cluster.worker_names)
    assert result.retried >= len(expired) > 0


def test_frozen_worker_cannot_overwrite_the_newer_attempt(cluster, profile, report):
    """SIGSTOP past the lease: another worker takes the job over; after SIGCONT the zombie is fenced off."""
    tenant = new_tenant("sigstop")
    # Longer jobs, so the frozen worker surely holds some; a rate the others keep up with, so the
    # takeover time measures the lease and the reconciler rather than a backlog.
    stream = JobStream(cluster.url, tenant, plan_jobs(profile.jobs, seed=2, min_sleep=0.2, max_sleep=1.0),
                       per_second=12).start()
    victim = cluster.worker_names[0]
    takeovers, frozen_total, zombies = [], 0, []
    for point in fault_points(profile.jobs, profile.repeats):
        wait_submitted(stream, point)
        attempts = wait_for(lambda: _running_attempts(cluster, victim, tenant), timeout=10,
                            what="the victim running some of the stream's jobs")
        frozen_at = time.time()
        cluster.kill_worker(victim, signal.SIGSTOP)
        try:
            seconds, taken = _wait_taken_over(cluster, attempts, frozen_at)
            zombies += taken
        finally:
            cluster.kill_worker(victim, signal.SIGCONT)
        takeovers.append(seconds)
        frozen_total += len(taken)
    stream.join()
    settle = wait_all_final(cluster, tenant, profile.jobs)
    result = report(audit(cluster, stream, f"sigstop x{profile.repeats} ({frozen_total} jobs frozen)", settle,
                          {"takeover_s": summary(takeovers)}))
    assert frozen_total > 0, "every frozen job had finished before the freeze"
    # The zombie woke up, went on with its old attempts, and was told it had lost them.
    wait_for(lambda: any(f"job {job_id} attempt {attempt}: lost" in cluster.workers[victim].log_text()
                         for job_id, attempt in zombies), timeout=30, what="the zombie fenced off")
    assert any(e["node"] == victim for e in events_with(cluster, tenant, "lease expired"))
    assert result.duplicates == 0


def _running_attempts(cluster, node: str, tenant: str) -> dict[str, int]:
    """{job id: attempt} of what `node` runs right now (read just before freezing it)."""
    return {str(r["id"]): r["attempt"] for r in cluster.query(
        "SELECT id, attempt FROM jobs WHERE state = 'running' AND node = :node AND tenant = :t",
        {"node": node, "t": tenant})}


def _wait_taken_over(cluster, attempts: dict[str, int], since: float, timeout: float = 60) -> tuple[float, list]:
    """Until no frozen job waits on the frozen attempt any more: (seconds since the freeze, the (job id, frozen
    attempt) pairs a newer attempt took over).

    A job that finished just before the freeze keeps its attempt; the others run (or ran) a newer one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = cluster.query("SELECT id, attempt, state FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))",
                             {"ids": list(attempts)})
        newer = [r for r in rows if r["attempt"] > attempts[str(r["id"])] and r["state"] != "retrying"]
        finished_before = [r for r in rows if r["attempt"] == attempts[str(r["id"])] and r["state"] in FINAL]
        if len(newer) + len(finished_before) == len(rows):
            return round(time.time() - since, 2), [(str(r["id"]), attempts[str(r["id"])]) for r in newer]
        time.sleep(0.1)
    raise TimeoutError("the frozen worker's jobs were not taken over")


AGENT_NODE = "chaos-agent"


def test_node_drained_while_its_jobs_run(cluster, profile, report, tmp_path):
    """`POST /nodes/<id>/drain`: the agent stops its worker with Celery's warm shutdown, so the jobs it runs
    finish there (no retry); the rest of the stream goes to the other workers; resume brings it back."""
    api = AdminApi(cluster.url)
    agent = cluster.process(["agent", "--hardware-fixture", str(FIXTURES / "cpu_only.json")], AGENT_NODE, {
        "NEXUS_DATA_DIR": str(tmp_path / "node"), "NEXUS_NODE_NAME": AGENT_NODE,
        "NEXUS_HEARTBEAT_INTERVAL_SECONDS": "0.3", "NEXUS_AGENT_DRAIN_GRACE_SECONDS": "30"}).start()
    try:
        node = wait_for(lambda: api.workers_running(AGENT_NODE), timeout=90, what="the agent's worker")
        tenant = new_tenant("drain")
        stream = JobStream(cluster.url, tenant, plan_jobs(profile.jobs, seed=7, min_sleep=0.2, max_sleep=1.0),
                           per_second=12).start()
        drains, finished_in_place = [], 0
        for point in fault_points(profile.jobs, profile.repeats):
            wait_submitted(stream, point)
            held = wait_running_on(cluster, AGENT_NODE, tenant, timeout=10)
            assert held, "the agent's worker ran none of the stream's jobs"
            attempts = _attempts(cluster, held)
            began = time.monotonic()
            api.post(f"/api/v1/nodes/{node['id']}/drain")
            wait_for(lambda: not api.workers_running(AGENT_NODE), timeout=60, what="workers stopped by the drain")
            drains.append(round(time.monotonic() - began, 2))
            finished_in_place += sum(1 for r in _rows(cluster, held)
                                     if r["node"] == AGENT_NODE and r["attempt"] == attempts[str(r["id"])]
                                     and r["state"] == "succeeded")
            api.post(f"/api/v1/nodes/{node['id']}/resume")
            wait_for(lambda: api.workers_running(AGENT_NODE), timeout=60, what="workers back after resume")
        stream.join()
        settle = wait_all_final(cluster, tenant, profile.jobs)
        report(audit(cluster, stream, f"drain x{profile.repeats} ({finished_in_place} jobs finished in place)",
                     settle, {"drain_s": summary(drains)}))
        # The invariants (all final, none lost or duplicated) are the audit's. Whether the held jobs were
        # still running when the drain landed is timing on a loaded 2-core machine, so it is reported only.
        if not finished_in_place:
            print("\nnote: the held jobs had all moved on before the drain landed; none finished in place")
    finally:
        agent.stop(timeout=40)


class AdminApi:
    def __init__(self, url: str):
        self.url, self.headers = url, {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def post(self, path: str) -> dict:
        response = requests.post(self.url + path, headers=self.headers, timeout=30)
        assert response.status_code < 300, response.text
        return response.json()

    def workers_running(self, name: str) -> dict | None:
        """The node, once it is ready and all its workers run; else None."""
        response = requests.get(self.url + "/api/v1/nodes", headers=self.headers, timeout=30)
        node = next((n for n in response.json()["nodes"] if n["name"] == name), None)
        if node and node["workers"] and all(w["running"] for w in node["workers"]):
            return node
        return None


def _rows(cluster, ids) -> list:
    return cluster.query("SELECT id, attempt, state, node FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))",
                         {"ids": [str(i) for i in ids]})


def _attempts(cluster, ids) -> dict[str, int]:
    return {str(r["id"]): r["attempt"] for r in _rows(cluster, ids)}
