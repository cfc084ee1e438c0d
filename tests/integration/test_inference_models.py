"""The model catalog, placement of instances on registered nodes, and an instance's lifecycle on a real worker."""

from __future__ import annotations

import pytest

from tests.agent_support import beat, registered
from tests.conftest import auth
from tests.inference_support import TINY, model_worker, tiny_model_dir, tiny_served  # noqa: F401
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)

CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def ready_node(api, name: str, fixture: str) -> str:
    node = registered(api, name, fixture)
    assert beat(api, node, fixture).status_code == 200
    return node["node_id"]


def declare(api, **body):
    return api.post("/api/v1/models", json={"source": "/models/x", **body}, headers=auth())


def test_catalog_declare_list_get_delete(api, services):
    created = declare(api, name="llama-8b", backend="vllm", vram_mb=20_000, min_tier="gpu_peer",
                      max_model_len=8192, args={"extra_args": ["--dtype", "bfloat16"]})
    assert created.status_code == 201, created.json
    assert created.json["backend"] == "vllm" and created.json["instances"] == []
    assert declare(api, name="llama-8b").status_code == 409
    assert declare(api, name="remote", backend="openai", source="",
                   args={"url": "http://gpu-box:8000/v1", "api_key": "k"}).status_code == 201
    listed = api.get("/api/v1/models", headers=auth()).json["models"]
    assert [m["name"] for m in listed] == ["llama-8b", "remote"]
    assert listed[1]["args"]["api_key"] == "***"
    assert api.get("/api/v1/models/llama-8b", headers=auth()).json["max_model_len"] == 8192
    assert api.delete("/api/v1/models/llama-8b", headers=auth()).status_code == 200
    assert api.get("/api/v1/models/llama-8b", headers=auth()).status_code == 404
    assert api.get("/v1/models", headers=auth()).json["data"][0]["id"] == "remote"


@pytest.mark.parametrize("body, message", [
    ({"name": "bad name!"}, "invalid request body"),
    ({"name": "m", "backend": "onnx"}, "invalid request body"),
    ({"name": "m", "vram_mb": -1}, "invalid request body"),
    ({"name": "m", "surprise": 1}, "invalid request body"),
    ({"name": "m", "backend": "vllm"}, "vram_mb"),
    ({"name": "m", "backend": "openai", "source": ""}, "args.url"),
    ({"name": "m", "args": {"url": "http://x"}}, "unknown args"),
])
def test_bad_declarations_are_400(api, services, body, message):
    response = declare(api, **body)
    assert response.status_code == 400 and message in response.json["error"]["message"]


def test_only_admins_change_the_catalog(api, services):
    token = api.post("/api/v1/tokens", json={"name": "alice", "role": "submitter"}, headers=auth()).json["token"]
    assert declare(api, name="m").status_code == 201
    assert api.post("/api/v1/models", json={"name": "n", "source": "/m"}, headers=auth(token)).status_code == 403
    assert api.post("/api/v1/models/m/instances", json={}, headers=auth(token)).status_code == 403
    assert api.get("/api/v1/models", headers=auth(token)).status_code == 200


def test_deploy_places_instances_on_registered_nodes(api, services):
    dgx_a, dgx_b = ready_node(api, "dgx-a", "h100x8"), ready_node(api, "dgx-b", "h100x8")
    peer = ready_node(api, "peer", "rtx4090")
    declare(api, name="llama-70b", backend="vllm", vram_mb=140_000, min_tier="ai_factory")
    declare(api, name="giant", backend="vllm", vram_mb=1_000_000, min_tier="ai_factory")
    declare(api, name="mistral-7b", backend="vllm", vram_mb=16_000, min_tier="gpu_peer")

    small = api.post("/api/v1/models/mistral-7b/instances", json={}, headers=auth())
    assert small.status_code == 201, small.json
    assert small.json["state"] == "pending" and small.json["node_id"] == peer
    assert small.json["plan"]["strategy"] == "single_gpu"

    giant = api.post("/api/v1/models/giant/instances", json={"nodes": [dgx_a, dgx_b]}, headers=auth())
    assert giant.status_code == 201, giant.json
    plan = giant.json["plan"]
    assert (plan["strategy"], plan["tensor_parallel_size"], plan["pipeline_parallel_size"]) == ("hybrid_tp_pp", 8, 2)
    assert {s["node_id"] for s in plan["stages"]} == {dgx_a, dgx_b} and plan["per_gpu_mb"] == 62_500

    # The pending giant holds 62.5 GB of every H100: 70 GB per GPU no longer fits; spread thin, it still does.
    squeezed = api.post("/api/v1/models/llama-70b/instances", json={}, headers=auth()).json
    gpus = squeezed["plan"]["tensor_parallel_size"] * squeezed["plan"]["pipeline_parallel_size"]
    assert gpus >= 8 and squeezed["plan"]["per_gpu_mb"] * gpus >= 140_000
    refused = api.post("/api/v1/models/llama-70b/instances", json={}, headers=auth())
    assert refused.status_code == 409 and refused.json["error"]["code"] == "no_capacity"
    for model, instance in (("giant", giant.json), ("llama-70b", squeezed)):
        assert api.delete(f"/api/v1/models/{model}/instances/{instance['id']}", headers=auth()).status_code == 200

    first = api.post("/api/v1/models/llama-70b/instances", json={}, headers=auth()).json
    assert first["plan"]["strategy"] == "tensor_parallel" and first["plan"]["tensor_parallel_size"] == 2
    assert first["node_id"] in (dgx_a, dgx_b) and len(first["gpus"]) == 2
    second = api.post("/api/v1/models/llama-70b/instances", json={}, headers=auth()).json
    taken = {(first["node_id"], g) for g in first["gpus"]}
    assert not taken & {(second["node_id"], g) for g in second["gpus"]}  # the pending instance's GPUs are held

    bad = api.post("/api/v1/models/llama-70b/instances", json={"tensor_parallel_size": 3}, headers=auth())
    assert bad.status_code == 400
    instances = api.get("/api/v1/models/llama-70b/instances", headers=auth()).json["instances"]
    assert [(i["id"], i["state"]) for i in instances] == [(squeezed["id"], "stopped"), (first["id"], "pending"),
                                                          (second["id"], "pending")]


def test_deploy_with_no_gpu_nodes_is_409(api, services):
    declare(api, name="llama-70b", backend="vllm", vram_mb=140_000)
    response = api.post("/api/v1/models/llama-70b/instances", json={}, headers=auth())
    assert response.status_code == 409 and "no ready node" in response.json["error"]["message"]


def test_agents_report_instance_states(api, services):
    declare(api, name="m")
    instance = api.post("/api/v1/models/m/instances", json={}, headers=auth()).json
    worker_token = api.post("/api/v1/tokens", json={"name": "agent", "role": "worker"}, headers=auth()).json["token"]
    url = f"/api/v1/models/m/instances/{instance['id']}/state"
    for state in ("downloading", "starting", "running"):
        reply = api.put(url, json={"state": state, "worker": "gpu0.node-a"}, headers=auth(worker_token))
        assert reply.status_code == 200 and reply.json["state"] == state
    assert api.put(url, json={"state": "sleeping"}, headers=auth(worker_token)).status_code == 400
    assert api.delete(f"/api/v1/models/m/instances/{instance['id']}", headers=auth()).json["state"] == "stopped"
    assert api.put(url, json={"state": "running"}, headers=auth(worker_token)).status_code == 409


def test_instance_lifecycle_on_a_serving_worker(api, services, tiny_served):
    def instances():
        return api.get(f"/api/v1/models/{TINY}/instances", headers=auth()).json["instances"]

    [running] = wait_for(lambda: [i for i in instances() if i["state"] == "running"], what="a running instance")
    assert running["live"] and running["worker"] == "model-worker"
    assert api.post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200

    stopped = api.delete(f"/api/v1/models/{TINY}/instances/{running['id']}", headers=auth())
    assert stopped.json["state"] == "stopped"
    unavailable = api.post("/v1/chat/completions", json=CHAT, headers=auth())
    assert unavailable.status_code == 503 and unavailable.json["error"]["code"] == "model_unavailable"

    deployed = api.post(f"/api/v1/models/{TINY}/instances", json={}, headers=auth()).json
    assert deployed["state"] == "pending" and deployed["plan"]["strategy"] == "cpu"
    wait_for(lambda: any(i["id"] == deployed["id"] and i["state"] == "running" and i["live"] for i in instances()),
             timeout=30, what="the worker adopting the new instance")
    again = api.post("/v1/chat/completions", json=CHAT, headers=auth())
    assert again.status_code == 200, again.json
    assert again.json["choices"][0]["message"]["role"] == "assistant"


def test_an_agent_runs_a_worker_per_instance(api, services, settings, session_dir, tiny_model_dir):
    """The agent's side with its real pieces: reconcile, the child's command and environment, the process."""
    import os
    import subprocess

    from nexus.models.instances import child_name, reconcile
    from nexus.worker.processes import instance_child

    assert declare(api, name="tiny-agent", source=str(tiny_model_dir), max_model_len=512).status_code == 201
    deployed = api.post("/api/v1/models/tiny-agent/instances", json={}, headers=auth()).json
    with services.engine.connect() as conn:
        from nexus.models.catalog import get_instance

        instance = get_instance(conn, deployed["id"])
    [(to_start, _)], stop = reconcile([instance], running=[])
    assert stop == []
    child = instance_child(to_start, "node-x", "box-x", settings, {**os.environ, **settings.worker_environment()})
    log = open(session_dir / "agent-child.log", "ab")
    process = subprocess.Popen(list(child.argv), env=dict(child.env), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        def state():
            return api.get("/api/v1/models/tiny-agent/instances", headers=auth()).json["instances"][0]

        running = wait_for(lambda: state()["state"] == "running" and state()["live"] and state(), timeout=60,
                           what="the instance's worker running")
        assert running["worker"] == f"{child_name(instance)}@box-x"
        chat = api.post("/v1/chat/completions", json={**CHAT, "model": "tiny-agent"}, headers=auth())
        assert chat.status_code == 200, chat.json
        from nexus.models.instances import desired_instances

        with services.engine.connect() as conn:
            desired = desired_instances(conn, "node-x")
        assert [i["id"] for i in desired] == [instance["id"]] and reconcile(desired, [child.name]) == ([], [])
        api.delete(f"/api/v1/models/tiny-agent/instances/{deployed['id']}", headers=auth())
        with services.engine.connect() as conn:
            assert desired_instances(conn, "node-x") == []
        assert reconcile([], running=[child.name]) == ([], [child.name])
    finally:
        os.killpg(process.pid, 15)
        process.wait(20)
        log.close()
