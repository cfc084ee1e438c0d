"""Node registration, heartbeats and the node admin API over real PostgreSQL and Redis."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from nexus.jobs import lifecycle

from tests.agent_support import beat, hardware, register, registered
from tests.conftest import auth
from tests.support import JOIN_TOKEN

pytestmark = pytest.mark.timeout(120)


def node_row(services, node_id: str) -> dict:
    with services.engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM nodes WHERE id = :id"), {"id": node_id}).mappings().one())


# --- registration ---------------------------------------------------------------------------------

def test_register_classifies_the_hardware_and_returns_a_node_token(api, services):
    answer = registered(api, "box-8xh100", "h100x8")
    assert answer["tier"] == "ai_factory" and answer["state"] == "registering"
    assert answer["node_token"].startswith("nxn_")
    row = node_row(services, answer["node_id"])
    assert row["gpu_count"] == 8 and row["queues"] == ["ai_factory"]
    assert row["token_hash"] != answer["node_token"] and answer["node_token"] not in str(row)


@pytest.mark.parametrize("headers", [{}, auth("nxj_wrong-join-token-000000000000"), {"Authorization": "Basic x"}])
def test_register_refuses_missing_or_bad_join_tokens(api, services, headers):
    body = {"name": "intruder", "hardware": hardware("cpu_only").to_dict(),
            "queues": ["cpu_only"], "agent_version": "x"}
    response = api.post("/api/v1/nodes/register", json=body, headers=headers)
    assert response.status_code == 401 and response.json["error"]["code"] == "unauthorized"
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM nodes")).scalar() == 0


def test_a_revoked_worker_token_no_longer_joins(api):
    created = api.post("/api/v1/tokens", json={"name": "join-rack-2", "role": "worker"}, headers=auth()).json
    assert register(api, "rack2-a", token=created["token"]).status_code == 201
    assert api.delete(f"/api/v1/tokens/{created['id']}", headers=auth()).status_code == 200
    assert register(api, "rack2-b", token=created["token"]).status_code == 401


def test_a_submitter_token_is_not_a_join_token(api):
    created = api.post("/api/v1/tokens", json={"name": "alice", "role": "submitter"}, headers=auth()).json
    assert register(api, "sneaky", token=created["token"]).status_code == 401


def test_register_rejects_bad_bodies_with_clear_errors(api):
    bad_hardware = register_raw(api, {"name": "x", "hardware": {"hostname": "x"}, "agent_version": "1"})
    assert bad_hardware.status_code == 400 and "hardware" in bad_hardware.json["error"]["message"]
    unknown = register_raw(api, {"name": "x", "hardware": {}, "agent_version": "1", "root": True})
    assert unknown.status_code == 400 and unknown.json["error"]["message"] == "invalid request body"
    absurd = hardware("rtx4090").to_dict()
    absurd["gpus"][0]["memory_total_mb"] = 10**12
    response = register_raw(api, {"name": "x", "hardware": absurd, "agent_version": "1"})
    assert response.status_code == 400 and "memory_total_mb" in response.json["error"]["message"]
    long_queue = register_raw(api, {"name": "x", "hardware": hardware("rtx4090").to_dict(), "agent_version": "1",
                                    "queues": ["q" * 201]})
    assert long_queue.status_code == 400


def register_raw(api, body):
    return api.post("/api/v1/nodes/register", headers=auth(JOIN_TOKEN), json=body)


def test_a_live_name_is_taken_but_an_offline_namesake_is_replaced(api, services):
    first = registered(api, "dup")
    assert register(api, "dup").status_code == 409
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE nodes SET state = 'offline' WHERE id = :id"), {"id": first["node_id"]})
    second = registered(api, "dup")
    assert node_row(services, first["node_id"])["state"] == "removed"
    assert beat(api, first).status_code == 401  # the old identity is gone for good
    assert beat(api, second).status_code == 200


def test_a_register_whose_answer_was_lost_may_be_retried(api, services):
    """The master created the row but the agent's request timed out: it holds no token and asks again."""
    lost = registered(api, "slow-answer")
    assert register(api, "slow-answer").status_code == 409  # a namesake registering right now keeps its name
    with services.engine.begin() as conn:  # as the agent retries after its request timeout
        conn.execute(text("UPDATE nodes SET registered_at = now() - interval '11 seconds' WHERE id = :id"),
                     {"id": lost["node_id"]})
    retried = registered(api, "slow-answer")
    assert node_row(services, lost["node_id"])["state"] == "removed"
    assert beat(api, retried).status_code == 200


# --- heartbeats -----------------------------------------------------------------------------------

def test_heartbeat_makes_the_node_ready_and_stores_its_resources(api, services):
    node = registered(api, "beater", "mixed_4090_3060")
    response = beat(api, node, "mixed_4090_3060", running_jobs=["j1"], loaded_models=["tiny"])
    assert response.status_code == 200
    assert response.json == {"state": "ready", "drain_requested": False, "max_concurrent": None, "labels": {},
                             "instances": []}
    row = node_row(services, node["node_id"])
    assert row["state"] == "ready" and row["running_jobs"] == ["j1"] and row["loaded_models"] == ["tiny"]
    assert [g["utilization_percent"] for g in row["resources"]["gpus"]] == [47, 0]
    assert row["resources"]["cpu_percent"] == 12.5


def test_a_node_token_cannot_act_as_another_node(api):
    alice, bob = registered(api, "alice-node"), registered(api, "bob-node")
    assert beat(api, alice, token=bob["node_token"]).status_code == 401
    assert beat(api, alice, token="nxn_forged").status_code == 401
    missing = api.post(f"/api/v1/nodes/{alice['node_id']}/heartbeat", json={})
    assert missing.status_code == 401
    # Nor is a node token an API token: the admin routes refuse it.
    assert api.get("/api/v1/nodes", headers=auth(alice["node_token"])).status_code == 401


def test_heartbeat_rejects_malformed_resources(api):
    node = registered(api, "sloppy")
    response = api.post(f"/api/v1/nodes/{node['node_id']}/heartbeat", headers=auth(node["node_token"]),
                        json={"state": "ready", "resources": {"gpus": [{"index": -1}]}})
    assert response.status_code == 400 and "fields" in response.json["error"]["details"]
    for bad in ({"running_jobs": ["x" * 65]}, {"resources": {"gpus": [{"index": 0, "uuid": "g", "memory_total_mb": 10**12,
                                                                         "memory_free_mb": 1}]}}):
        response = api.post(f"/api/v1/nodes/{node['node_id']}/heartbeat", headers=auth(node["node_token"]), json=bad)
        assert response.status_code == 400, response.json


def test_removed_node_is_refused_and_its_jobs_are_requeued(api, services):
    node = registered(api, "doomed")
    beat(api, node)
    job = _running_job_on(services, "doomed")
    response = api.delete(f"/api/v1/nodes/{node['node_id']}", headers=auth())
    assert response.status_code == 200 and response.json["state"] == "removed"
    assert beat(api, node).status_code == 401
    with services.engine.connect() as conn:
        lease = conn.execute(text("SELECT lease_expires_at < now() FROM jobs WHERE id = :id"), {"id": job}).scalar()
    assert lease is True  # the reconciler's next pass re-queues it
    assert api.post(f"/api/v1/nodes/{node['node_id']}/resume", headers=auth()).status_code == 409
    assert api.get("/api/v1/nodes", headers=auth()).json["nodes"] == []
    assert len(api.get("/api/v1/nodes?state=removed", headers=auth()).json["nodes"]) == 1


def _running_job_on(services, node_name: str, queue_tier: str = "gpu_peer") -> str:
    """A job claimed by `node_name` (on a queue no test worker consumes, so nothing else takes it)."""
    [(row, _)] = services.submitter.submit_many([{"type": "noop", "requirements": {"tier": queue_tier}}],
                                                tenant="default")
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, row.id, 1, node_name, 60) is not None
    return str(row.id)


# --- admin: drain, resume, patch, list --------------------------------------------------------------

def test_drain_and_resume(api, services):
    node = registered(api, "drainee")
    beat(api, node)
    drained = api.post(f"/api/v1/nodes/{node['node_id']}/drain", headers=auth()).json
    assert drained["state"] == "draining" and drained["drain_requested"] is True
    assert beat(api, node).json["state"] == "draining"  # the agent learns it from its next beat
    resumed = api.post(f"/api/v1/nodes/{node['node_id']}/resume", headers=auth()).json
    assert resumed["state"] == "ready" and resumed["drain_requested"] is False
    assert beat(api, node).json == {"state": "ready", "drain_requested": False, "max_concurrent": None,
                                    "labels": {}, "instances": []}


def test_agent_shutdown_drains_then_stops_and_forfeits_its_leases(api, services):
    node = registered(api, "leaver")
    beat(api, node)
    job = _running_job_on(services, "leaver")
    assert beat(api, node, state="draining").json["state"] == "draining"
    assert beat(api, node, state="stopped").json["state"] == "offline"
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT lease_expires_at < now() FROM jobs WHERE id = :id"), {"id": job}).scalar()
    assert beat(api, node).json["state"] == "ready"  # the same identity comes back after a restart


def test_patch_labels_and_max_concurrent_reach_the_agent(api):
    node = registered(api, "patched")
    response = api.patch(f"/api/v1/nodes/{node['node_id']}", headers=auth(),
                         json={"labels": {"zone": "eu-1"}, "max_concurrent": 2})
    assert response.status_code == 200 and response.json["labels"] == {"zone": "eu-1"}
    assert beat(api, node).json["max_concurrent"] == 2
    reset = api.patch(f"/api/v1/nodes/{node['node_id']}", headers=auth(), json={"max_concurrent": None}).json
    assert reset["max_concurrent"] is None and reset["labels"] == {"zone": "eu-1"}
    for bad in ({"max_concurrent": 0}, {"labels": {"bad key!": "x"}}, {"state": "ready"}):
        assert api.patch(f"/api/v1/nodes/{node['node_id']}", headers=auth(), json=bad).status_code == 400


def test_list_filters_and_permissions(api):
    for name, fixture in (("h", "h100x8"), ("p", "rtx4090"), ("i", "rtx3060"), ("c", "cpu_only")):
        node = registered(api, name, fixture)
        beat(api, node, fixture, loaded_models=["tiny"] if name == "p" else [])
    names = lambda query: sorted(n["name"] for n in api.get(f"/api/v1/nodes{query}", headers=auth()).json["nodes"])
    assert names("") == ["c", "h", "i", "p"]
    assert names("?tier=gpu_peer") == ["p"]
    assert names("?has_gpu=false") == ["c"]
    assert names("?has_gpu=true&state=ready") == ["h", "i", "p"]
    assert names("?model=tiny") == ["p"]
    assert api.get("/api/v1/nodes?tier=mainframe", headers=auth()).status_code == 400
    submitter = api.post("/api/v1/tokens", json={"name": "s", "role": "submitter"}, headers=auth()).json["token"]
    assert api.get("/api/v1/nodes", headers=auth(submitter)).status_code == 403
    assert api.get("/api/v1/nodes/00000000-0000-0000-0000-000000000000", headers=auth()).status_code == 404


# --- can-fit, reservations, cluster, metrics ----------------------------------------------------------

def _gpu_fleet(api) -> dict[str, dict]:
    nodes = {}
    for name, fixture in (("h100s", "h100x8"), ("p4090", "rtx4090"), ("duo3090", "rtx3090x2"),
                          ("i3060", "rtx3060"), ("cpu", "cpu_only")):
        nodes[name] = registered(api, name, fixture)
        beat(api, nodes[name], fixture)
    return nodes


def test_can_fit_picks_the_least_capable_tier_that_fits(api):
    nodes = _gpu_fleet(api)
    fit = lambda body: api.post("/api/v1/gpu/can-fit", json=body, headers=auth()).json
    small = fit({"required_mb": 8000})
    assert [n["node_id"] for n in small["nodes"]][0] == nodes["i3060"]["node_id"]
    assert nodes["cpu"]["node_id"] not in [n["node_id"] for n in small["nodes"]]
    two = fit({"required_mb": 20000, "gpu_count": 2})
    assert {n["node_id"] for n in two["nodes"]} == {nodes["duo3090"]["node_id"], nodes["h100s"]["node_id"]}
    assert fit({"required_mb": 60000, "tier": "ai_factory", "gpu_count": 8})["nodes"][0]["chosen"] == list(range(8))
    assert fit({"required_mb": 90000})["fits"] is False
    bad = api.post("/api/v1/gpu/can-fit", json={"required_mb": -1}, headers=auth())
    assert bad.status_code == 400


def test_reservations_are_honoured_by_can_fit_and_expire(api):
    nodes = _gpu_fleet(api)
    p4090 = nodes["p4090"]["node_id"]
    free = api.post("/api/v1/gpu/can-fit", json={"required_mb": 20000, "tier": "gpu_peer"}, headers=auth()).json
    assert p4090 in [n["node_id"] for n in free["nodes"]]
    created = api.post("/api/v1/gpu/reservations", headers=auth(),
                       json={"node_id": p4090, "gpu_index": 0, "memory_mb": 15000, "ttl_seconds": 600})
    assert created.status_code == 201
    after = api.post("/api/v1/gpu/can-fit", json={"required_mb": 20000, "tier": "gpu_peer"}, headers=auth()).json
    assert p4090 not in [n["node_id"] for n in after["nodes"]]
    too_much = api.post("/api/v1/gpu/reservations", headers=auth(),
                        json={"node_id": p4090, "gpu_index": 0, "memory_mb": 10000})
    assert too_much.status_code == 409 and too_much.json["error"]["details"]["available_mb"] < 10000
    assert api.post("/api/v1/gpu/reservations", headers=auth(),
                    json={"node_id": nodes["cpu"]["node_id"], "gpu_index": 0, "memory_mb": 1}).status_code == 400
    released = api.delete(f"/api/v1/gpu/reservations/{created.json['id']}", headers=auth())
    assert released.status_code == 200
    again = api.post("/api/v1/gpu/can-fit", json={"required_mb": 20000, "tier": "gpu_peer"}, headers=auth()).json
    assert p4090 in [n["node_id"] for n in again["nodes"]]
    short = api.post("/api/v1/gpu/reservations", headers=auth(),
                     json={"node_id": p4090, "gpu_index": 0, "memory_mb": 15000, "ttl_seconds": 0.5}).json
    time.sleep(0.8)
    expired = api.post("/api/v1/gpu/can-fit", json={"required_mb": 20000, "tier": "gpu_peer"}, headers=auth()).json
    assert p4090 in [n["node_id"] for n in expired["nodes"]], short
    assert api.get("/api/v1/gpu/reservations", headers=auth()).json["reservations"] == []


def test_cluster_totals_and_metrics(api):
    _gpu_fleet(api)
    cluster = api.get("/api/v1/cluster", headers=auth()).json
    assert cluster["tiers"]["ai_factory"]["gpus"] == 8
    assert cluster["tiers"]["gpu_peer"]["nodes"] == 2 and cluster["tiers"]["gpu_peer"]["gpus"] == 3
    assert cluster["tiers"]["cpu_only"]["nodes_by_state"] == {"ready": 1}
    assert cluster["totals"]["gpus"] == 12
    assert cluster["totals"]["vram_free_mb"] == sum(g.memory_free_mb for f in ("h100x8", "rtx4090", "rtx3090x2",
                                                                                 "rtx3060") for g in hardware(f).gpus)
    assert set(cluster["queues"]) >= {"ai_factory", "gpu_peer", "gpu_infra", "cpu_only"}
    metrics = api.get("/metrics", headers=auth()).get_data(as_text=True)
    assert 'nexus_nodes{state="ready",tier="gpu_peer"} 2.0' in metrics
    assert 'nexus_gpu_utilization_percent{gpu="0",node="p4090",tier="gpu_peer"}' in metrics
    assert "nexus_node_heartbeat_age_seconds{" in metrics and "nexus_gpu_memory_free_bytes{" in metrics
