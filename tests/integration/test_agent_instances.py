"""A real `nexus agent` on a CPU node runs the model instances the API places on it.

Deploy the tiny model (weights in the session's S3) to the agent's node: the
agent starts a serving worker for the instance with the node's max_concurrent,
the worker downloads the weights and serves, /v1/chat/completions is answered
through the API, the heartbeat shows the worker and the loaded model. DELETE
the instance: the agent stops its worker and the instance stays stopped. A
second instance, then SIGTERM: the agent stops the worker cleanly and the
instance waits (pending) for the node's return. Real processes and servers only.
"""

from __future__ import annotations

import signal
import uuid

import psutil
import pytest
import requests

from nexus.serving.weights import upload_folder
from nexus.queueing.health import worker_records
from nexus.storage import make_object_store
from tests.agent_support import ApiClient, FIXTURES
from tests.inference_support import MODEL_ENV, tiny_model_dir  # noqa: F401
from tests.support import NexusProcess, wait_for

pytestmark = pytest.mark.timeout(150)

NODE = "inference-node"
MODEL = "tiny-node"


class Api(ApiClient):
    def node(self) -> dict | None:
        return next((n for n in self("GET", "/api/v1/nodes")["nodes"] if n["name"] == NODE), None)

    def instance(self, instance_id: str) -> dict:
        instances = self("GET", f"/api/v1/models/{MODEL}/instances")["instances"]
        return next(i for i in instances if i["id"] == instance_id)

    def instance_workers(self) -> list[dict]:
        return [w for w in (self.node() or {}).get("workers", []) if w.get("instance_id")]


def deploy(api: Api, node_id: str) -> dict:
    deployed = api("POST", f"/api/v1/models/{MODEL}/instances", expect=201, json={"nodes": [node_id]})
    assert deployed["state"] == "pending" and deployed["node_id"] == node_id
    return deployed


def serving(api: Api, instance_id: str, agent: NexusProcess) -> dict:
    def running():
        assert agent.process.poll() is None, agent.log_text()[-3000:]
        instance = api.instance(instance_id)
        assert instance["state"] != "error", instance["error"]
        return instance["state"] == "running" and instance["live"] and instance

    return wait_for(running, timeout=60, interval=0.2, what="the instance running on the agent's worker")


def test_the_agent_serves_the_instances_placed_on_its_node(settings, services, live_api, tmp_path, tiny_model_dir):
    api = Api(*live_api)
    store = make_object_store(settings)
    store.ensure_buckets([settings.bucket_models])
    prefix = f"agent-test/{uuid.uuid4().hex[:8]}"
    upload_folder(store, tiny_model_dir, settings.bucket_models, prefix)
    api("POST", "/api/v1/models", expect=201, json={"name": MODEL, "source": f"s3://{settings.bucket_models}/{prefix}",
                                                     "max_model_len": 512})
    env = {**MODEL_ENV, "NEXUS_DATA_DIR": str(tmp_path / "node"), "NEXUS_NODE_NAME": NODE,
           "NEXUS_HEARTBEAT_INTERVAL_SECONDS": "0.3", "NEXUS_AGENT_DRAIN_GRACE_SECONDS": "5",
           "NEXUS_WORKER_POOL": "threads", "NEXUS_WORKER_CONCURRENCY": "3"}
    agent = NexusProcess(settings, ["agent", "--hardware-fixture", str(FIXTURES / "cpu_only.json")], tmp_path,
                         "inference-agent", env).start()
    try:
        node = wait_for(lambda: (n := api.node()) and n["state"] == "ready" and n, timeout=60, what="registration")
        api("PATCH", f"/api/v1/nodes/{node['id']}", json={"max_concurrent": 3})

        first = deploy(api, node["id"])
        running = serving(api, first["id"], agent)
        assert running["worker"] == f"model-{first['id']}@{NODE}"
        [worker] = wait_for(api.instance_workers, timeout=10, what="the instance worker in a heartbeat")
        assert worker["instance_id"] == first["id"] and worker["model"] == MODEL and worker["running"]
        wait_for(lambda: api.node()["loaded_models"] == [MODEL], timeout=10, what="the loaded model in a heartbeat")
        # The node's max_concurrent is the serving worker's concurrency (its health record says so).
        record = wait_for(lambda: next((r for r in worker_records(services.redis)
                                        if r["name"].startswith(f"model-{first['id']}@")), None),
                          timeout=20, what="the serving worker's health record")
        assert record["concurrency"] == 3

        chat = api("POST", "/v1/chat/completions", json={"model": MODEL, "max_tokens": 5,
                                                         "messages": [{"role": "user", "content": "hello"}]})
        assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] >= 1

        api("DELETE", f"/api/v1/models/{MODEL}/instances/{first['id']}")
        wait_for(lambda: not api.instance_workers(), timeout=30, what="the agent stopping the instance's worker")
        assert not psutil.pid_exists(worker["pid"]) or psutil.Process(worker["pid"]).status() == psutil.STATUS_ZOMBIE
        assert api.instance(first["id"])["state"] == "stopped"
        wait_for(lambda: api.node()["loaded_models"] == [], timeout=10, what="the model off the heartbeat")

        second = deploy(api, node["id"])
        serving(api, second["id"], agent)
        [worker] = wait_for(api.instance_workers, timeout=10, what="the second instance's worker")
        agent.signal(signal.SIGTERM)
        assert agent.process.wait(30) == 0, agent.log_text()[-3000:]
        assert not psutil.pid_exists(worker["pid"])
        after = api.instance(second["id"])
        assert after["state"] == "pending" and not after["live"]  # waits for the node's return
        assert api.node()["state"] == "offline"
    finally:
        agent.stop(timeout=20)
