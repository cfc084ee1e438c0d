"""Faults of the control plane and of tenants, with real agents (node rows, heartbeats, quarantine).

- The whole API (user API and node API) is down longer than a node takes to go offline while
  jobs run: the nodes go offline, their workers renew their leases, and no attempt is lost.
- One tenant floods failing jobs: no node is quarantined (its jobs failed, not the nodes), the
  other tenant's jobs all succeed, and a node whose worker dies mid-job still is quarantined.
- A backlog waits on a queue nobody consumes for many reconcile passes: the broker keeps one
  message per waiting job, not one more per pass.
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
import requests

from nexus.jobs import fairshare
from nexus.queueing import broker
from nexus.config import Settings
from nexus.queueing.routing import Requirements, route_for, vram_thresholds
from tests.chaos.agents import AgentNodes
from tests.chaos.audit import audit, events_with, wait_all_final
from tests.chaos.cluster import NODE_OFFLINE_AFTER_SECONDS, NODE_QUARANTINE_AFTER_FAILURES
from tests.chaos.faults import new_tenant, wait_running_on, wait_submitted
from tests.chaos.stream import MAX_ATTEMPTS, JobStream, Planned, plan_jobs
from tests.support import ADMIN_TOKEN, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

HEALTHY = ["chaos-node-1", "chaos-node-2"]
BROKEN = "chaos-node-broken"  # its worker is killed mid-job; it restarts only after the leases expired
OUTAGE_SECONDS = {"short": 2.5 * NODE_OFFLINE_AFTER_SECONDS, "soak": 90.0}
BACKLOG_JOBS = {"short": 300, "soak": 2000}
BACKLOG_WAIT_SECONDS = {"short": 20.0, "soak": 120.0}  # 40 (240) reconcile passes


@pytest.fixture(scope="module")
def agent_nodes(chaos_cluster, tmp_path_factory):
    chaos_cluster.ensure_running()
    nodes = AgentNodes(chaos_cluster, tmp_path_factory.mktemp("agents"), [*HEALTHY, BROKEN],
                       {BROKEN: {"NEXUS_AGENT_RESTART_BACKOFF_BASE_SECONDS": "8",
                                 "NEXUS_AGENT_RESTART_BACKOFF_MAX_SECONDS": "8"}})
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture
def agents(cluster, agent_nodes) -> AgentNodes:
    """The module's agents, each ready with its worker (a test may have left one quarantined)."""
    for name, node in agent_nodes.nodes().items():
        if node["state"] == "quarantined":
            agent_nodes.resume(name)
    for name in agent_nodes.names:
        agent_nodes.wait_working(name)
    return agent_nodes


def sleeps(prefix: str, count: int, low: float, high: float, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    return [Planned(f"{prefix}-{i}", {"type": "sleep", "payload": {"seconds": round(rng.uniform(low, high), 2)},
                                      "max_attempts": MAX_ATTEMPTS, "idempotency_key": f"{prefix}-{i}"}, True)
            for i in range(count)]


def test_api_outage_longer_than_offline_loses_no_attempt(cluster, agents, profile, report):
    """Both API listeners are killed for longer than node_offline_after_seconds while ~100 jobs run.

    Every node goes offline (no heartbeat reaches the master), yet its workers renew their leases in
    PostgreSQL throughout: no job may get a second attempt through `lease expired`."""
    outage = OUTAGE_SECONDS[profile.name]
    tenant = new_tenant("api-outage")
    seed = uuid.uuid4().int % 1000
    planned = sleeps(f"outage-{seed}", 100, 2.0, 6.0, seed) + plan_jobs(profile.jobs // 3, seed=seed)
    stream = JobStream(cluster.url, tenant, planned, per_second=60).start()
    wait_submitted(stream, 100)
    wait_for(lambda: len(_running(cluster, tenant)) >= 6, timeout=30, what="the agents running the long jobs")

    killed_at = time.monotonic()
    cluster.api.kill()  # `nexus master` and both gunicorns (user API, node API): one process group
    assert not cluster.api_healthy()
    offline_running = wait_for(lambda: _all_offline_with_running(agents, cluster, tenant),
                               timeout=outage, interval=0.25, what="every agent node offline while running jobs")
    time.sleep(max(0.0, outage - (time.monotonic() - killed_at)))
    still_running = len(_running(cluster, tenant))
    down_s = round(time.monotonic() - killed_at, 1)
    cluster.start_api()
    for name in agents.names:
        wait_for(lambda: agents.node_rows()[name]["state"] == "ready", timeout=30, what=f"{name} ready again")

    stream.join()
    settle = wait_all_final(cluster, tenant, len(planned))
    report(audit(cluster, stream, f"api outage {down_s}s ({offline_running} jobs running on offline nodes, "
                                  f"{still_running} at the restart)", settle, {"outage_s": down_s}))
    expired = events_with(cluster, tenant, "lease expired")
    assert not expired, f"attempts lost to `lease expired` while their workers renewed them: {expired[:10]}"


def _running(cluster, tenant: str) -> list:
    return cluster.query("SELECT id, node FROM jobs WHERE tenant = :t AND state = 'running'", {"t": tenant})


def _all_offline_with_running(agents: AgentNodes, cluster, tenant: str) -> int:
    """Jobs running on the agent nodes once every one of them is offline (0 until then, or if none run)."""
    if any(row["state"] != "offline" for row in agents.node_rows().values()):
        return 0
    return sum(r["node"] in agents.names for r in _running(cluster, tenant))


def test_one_tenants_failing_flood_quarantines_no_node_but_a_broken_node_still_is(cluster, agents, profile, report):
    """Tenant A floods 200 `noop` jobs that fail every attempt; tenant B submits normally meanwhile.
    Then the broken node's worker is SIGKILLed while it runs B's jobs: its leases expire unrenewed."""
    flood_count = 200 if profile.name == "short" else 1000
    tenant_a, tenant_b = new_tenant("flood-a"), new_tenant("steady-b")
    token_a, token_b = _submitter(cluster, tenant_a), _submitter(cluster, tenant_b)
    seed = uuid.uuid4().int % 1000
    planned_b = sleeps(f"steady-{seed}", profile.jobs // 2, 0.3, 1.5, seed)
    stream_b = JobStream(cluster.url, tenant_b, planned_b, per_second=5, token=token_b).start()  # ~30 s
    flood = [{"type": "noop", "payload": {"fail_attempts": 100}, "max_attempts": 2} for _ in range(flood_count)]
    for start in range(0, flood_count, 100):
        response = requests.post(cluster.url + "/api/v1/jobs/bulk", json={"jobs": flood[start:start + 100]},
                                 headers={"Authorization": f"Bearer {token_a}"}, timeout=30)
        assert response.status_code == 201, response.text
    # Until the flood is over, or a node was quarantined by it (which leaves its retries nowhere to run).
    wait_for(lambda: _quarantined(agents) or _all_final(cluster, tenant_a, flood_count), timeout=120,
             interval=0.25, what="tenant A's flood final")
    assert not _quarantined(agents), f"tenant A's failing jobs quarantined {_quarantined(agents)}"
    failed_attempts = cluster.query("SELECT count(*) AS n FROM job_events e JOIN jobs j ON j.id = e.job_id "
                                    "WHERE j.tenant = :t AND e.from_state = 'running' "
                                    "AND e.to_state IN ('retrying', 'failed')", {"t": tenant_a})[0]["n"]
    assert failed_attempts == 2 * flood_count
    flood_nodes = {r["node"] for r in cluster.query("SELECT DISTINCT e.node FROM job_events e JOIN jobs j "
                                                    "ON j.id = e.job_id WHERE j.tenant = :t AND e.node IS NOT NULL",
                                                    {"t": tenant_a})}
    assert flood_nodes <= set(agents.names) and len(flood_nodes) >= 2, flood_nodes
    assert not _quarantined(agents), f"tenant A's failing jobs quarantined {_quarantined(agents)}"

    # A genuinely broken node: its worker dies while it runs B's jobs, with no success in between.
    # Longer jobs, enough to fill every node's slots, so the broken one surely holds some.
    planned_held = sleeps(f"held-{seed}", 30, 3.0, 6.0, seed)
    stream_held = JobStream(cluster.url, tenant_b, planned_held, per_second=100, token=token_b).start()
    held = wait_for(lambda: len(ids := cluster.running_on(BROKEN, tenant_b)) >= min(
        NODE_QUARANTINE_AFTER_FAILURES, cluster.settings.worker_concurrency) and ids,
                    timeout=60, interval=0.05, what=f"{BROKEN} running B's jobs")
    kills = [agents.kill_worker(BROKEN)]
    wait_for(lambda: agents.node_rows()[BROKEN]["state"] == "quarantined" or _kill_again(agents, cluster, tenant_b,
                                                                                         kills),
             timeout=60, interval=0.25, what=f"{BROKEN} quarantined")
    assert all(row["state"] != "quarantined" for name, row in agents.node_rows().items() if name != BROKEN)

    stream_b.join()
    stream_held.join()
    both = JobStream(cluster.url, tenant_b, planned_b + planned_held)  # one audit over all of B's jobs
    both.ids = {**stream_b.ids, **stream_held.ids}
    settle = wait_all_final(cluster, tenant_b, len(both.planned))
    result = report(audit(cluster, both, f"tenant flood of {flood_count} failing jobs; broken node killed "
                                         f"x{len(kills)} ({len(held)} held)", settle, {}))
    assert result.succeeded == len(both.planned), "every one of tenant B's jobs must succeed"
    expired_on = {e["node"] for e in events_with(cluster, tenant_b, "lease expired")}
    assert expired_on == {BROKEN}, expired_on


def _quarantined(agents: AgentNodes) -> dict[str, int]:
    """{name: failure streak} of the agent nodes now quarantined."""
    return {name: row["consecutive_failures"] for name, row in agents.node_rows().items()
            if row["state"] == "quarantined"}


def _all_final(cluster, tenant: str, expected: int) -> bool:
    rows = cluster.query("SELECT count(*) FILTER (WHERE finished_at IS NOT NULL) AS final, count(*) AS n "
                         "FROM jobs WHERE tenant = :t", {"t": tenant})[0]
    return rows["n"] >= expected and rows["final"] == rows["n"]


def _kill_again(agents: AgentNodes, cluster, tenant: str, kills: list) -> bool:
    """Not quarantined yet (the kill caught fewer jobs than the threshold, say): once the agent restarted
    the worker and it runs B's jobs again, kill it again. Always False: the caller keeps waiting."""
    if len(kills) < 4 and cluster.running_on(BROKEN, tenant) and agents.worker_process(BROKEN):
        kills.append(agents.kill_worker(BROKEN))
    return False


def _submitter(cluster, tenant: str) -> str:
    response = requests.post(cluster.url + "/api/v1/tokens", json={"name": tenant, "role": "submitter",
                                                                   "tenant": tenant},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["token"]


def test_backlog_on_an_unconsumed_queue_keeps_one_message_per_job(cluster, agents, profile, report):
    """Jobs for a tier no agent has wait for many reconcile passes while the agents run a stream."""
    count, wait = BACKLOG_JOBS[profile.name], BACKLOG_WAIT_SECONDS[profile.name]
    requirements = {"tier": "ai_factory"}
    queue = route_for(Requirements.parse(requirements), vram_thresholds(Settings()))  # a pinned tier: no VRAM rule
    backlog_tenant, tenant = new_tenant("backlog"), new_tenant("beside-backlog")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    backlog_ids = []
    for start in range(0, count, 500):
        jobs = [{"type": "noop", "tenant": backlog_tenant, "requirements": requirements}
                for _ in range(min(500, count - start))]
        response = requests.post(cluster.url + "/api/v1/jobs/bulk", json={"jobs": jobs}, headers=headers, timeout=60)
        assert response.status_code == 201, response.text
        backlog_ids += [job["id"] for job in response.json()["jobs"]]
    seed = uuid.uuid4().int % 1000
    stream = JobStream(cluster.url, tenant, plan_jobs(profile.jobs // 3, seed=seed), per_second=10).start()
    try:
        time.sleep(wait)
        waiting = cluster.query("SELECT count(*) AS n FROM jobs WHERE queue = :q AND state = 'queued'",
                                {"q": queue})[0]["n"]
        # The tenant's jobs past its share of the queue wait as held rows without a message (nexus.jobs.fairshare).
        published = cluster.query(f"SELECT count(*) AS n FROM jobs j WHERE queue = :q AND {fairshare.published('j')}",
                                  {"q": queue})[0]["n"]
        messages = broker.queue_depth(cluster.services.redis, queue) + broker.held_by_queue(cluster.services.redis)[queue]
        stream.join()
        settle = wait_all_final(cluster, tenant, len(stream.planned))
        report(audit(cluster, stream, f"backlog of {count} on {queue} for {wait:g}s: {messages} messages "
                                      f"for {published} of {waiting} waiting jobs published", settle, {}))
        assert waiting >= count
        share = cluster.services.settings.max_broker_messages_per_tenant
        assert published == (min(share, waiting) if share else waiting)
        assert published <= messages <= 1.05 * published, f"{messages} broker messages for {published} published jobs"
    finally:
        for job_id in backlog_ids:  # nobody will run them; later tests should not count them
            requests.post(f"{cluster.url}/api/v1/jobs/{job_id}/cancel", headers=headers, timeout=30)
