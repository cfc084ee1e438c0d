"""The master's side of multi-node instances on Ray, through the real API and database (no agents):
each member's heartbeat answer names its part (head or member, the head's address, the port block, the
token), two instances never share a port block, the API never shows the token, and a lost member takes
the instance to `error` (nobody is told to run it) until the reconciler's pass places it again."""

from __future__ import annotations

import time

from nexus.agent.heartbeat import heartbeat_body
from nexus.models.ray_clusters import LOST_MEMBER, PORT_BLOCK, reconcile_multi_node
from tests.agent_support import hardware, registered
from tests.conftest import auth


def beat(api, node: dict, address: str, state: str = "ready") -> dict:
    body = heartbeat_body(hardware("rtx4090"), state=state, running_jobs=[], loaded_models=[], workers=[],
                          cpu_percent=1.0, sent_at=time.time(), address=address)
    response = api.post(f"/api/v1/nodes/{node['node_id']}/heartbeat", json=body, headers=auth(node["node_token"]))
    assert response.status_code == 200, response.json
    return response.json


def deploy(api, nodes: list[dict]) -> dict:
    response = api.post("/api/v1/models/big/instances", headers=auth(),
                        json={"nodes": [n["node_id"] for n in nodes], "pipeline_parallel_size": 2})
    assert response.status_code == 201, response.json
    return response.json


def test_members_are_told_their_part_and_a_lost_member_fails_the_instance_until_it_is_placed_again(
        api, services, settings):
    a, b = registered(api, "ray-a", "rtx4090"), registered(api, "ray-b", "rtx4090")
    address = {a["node_id"]: "10.0.0.1", b["node_id"]: "10.0.0.2"}
    for node in (a, b):
        beat(api, node, address[node["node_id"]])
    assert api.post("/api/v1/models", headers=auth(), json={"name": "big", "source": "/shared/big", "backend": "vllm",
                                                            "vram_mb": 30_000, "min_tier": "gpu_peer"}).status_code == 201
    instance = deploy(api, [a, b])
    assert instance["plan"]["strategy"] == "pipeline_parallel" and instance["plan"]["ray"] == {
        "port_base": settings.ray_port_base}  # no token in the API's view
    head = a if instance["node_id"] == a["node_id"] else b
    member = b if head is a else a

    head_order, = beat(api, head, address[head["node_id"]])["instances"]
    member_order, = beat(api, member, address[member["node_id"]])["instances"]
    assert head_order["ray"]["role"] == "head" and member_order["ray"]["role"] == "member"
    for order in (head_order, member_order):
        assert order["ray"]["head_address"] == address[head["node_id"]] and order["ray"]["nodes"] == 2
        assert order["ray"]["port_base"] == settings.ray_port_base and len(order["ray"]["token"]) == 64
        assert "ray" not in order["plan"]  # the token travels once, in the order's own part
    assert head_order["ray"]["token"] == member_order["ray"]["token"]
    assert member_order["gpus"] == [0]

    # A second instance of the same nodes would not fit (one GPU each); a third node pair is not needed to
    # see port blocks differ: a model that fits half a GPU each shares the nodes.
    assert api.post("/api/v1/models", headers=auth(), json={"name": "small", "source": "/shared/s", "backend": "vllm",
                                                            "vram_mb": 2_000, "min_tier": "gpu_peer"}).status_code == 201
    other = api.post("/api/v1/models/small/instances", headers=auth(),
                     json={"nodes": [a["node_id"], b["node_id"]], "pipeline_parallel_size": 2}).json
    assert other["plan"]["ray"]["port_base"] == settings.ray_port_base + PORT_BLOCK
    assert api.delete(f"/api/v1/models/small/instances/{other['id']}", headers=auth()).status_code == 200

    # The member's agent stops (its goodbye): the instance fails, and neither node is told to run it.
    beat(api, member, address[member["node_id"]], state="stopped")
    counts = reconcile_multi_node(services.engine, settings)
    assert counts == {"instances_member_lost": 1, "instances_placed_again": 0}  # nowhere to go yet
    failed = api.get("/api/v1/models/big/instances", headers=auth()).json["instances"][0]
    assert failed["state"] == "error" and failed["error"] == f"{LOST_MEMBER}{member_name(member)}"
    assert beat(api, head, address[head["node_id"]])["instances"] == []

    # Back: placed again on a new cluster (another port block, another token).
    beat(api, member, address[member["node_id"]])
    assert reconcile_multi_node(services.engine, settings) == {"instances_member_lost": 0,
                                                               "instances_placed_again": 1}
    again = api.get("/api/v1/models/big/instances", headers=auth()).json["instances"][0]
    assert again["state"] == "pending" and again["error"].startswith("placed again after " + LOST_MEMBER)
    assert again["plan"]["ray"]["port_base"] != settings.ray_port_base
    orders = [beat(api, n, address[n["node_id"]])["instances"][0]["ray"] for n in (a, b)]
    assert {o["role"] for o in orders} == {"head", "member"} and orders[0]["token"] != head_order["ray"]["token"]
    assert reconcile_multi_node(services.engine, settings) == {"instances_member_lost": 0,
                                                               "instances_placed_again": 0}


def member_name(node: dict) -> str:
    return node["name"]


def test_a_plan_across_nodes_needs_vllm_and_a_shared_path(api, services):
    a, b = registered(api, "ray-c", "rtx4090"), registered(api, "ray-d", "rtx4090")
    for node, ip in ((a, "10.0.0.3"), (b, "10.0.0.4")):
        beat(api, node, ip)
    for name, body in (("t", {"backend": "transformers", "source": "/m"}),
                       ("s3", {"backend": "vllm", "source": "s3://models/x"})):
        api.post("/api/v1/models", headers=auth(), json={"name": name, "vram_mb": 30_000, "min_tier": "gpu_peer", **body})
        response = api.post(f"/api/v1/models/{name}/instances", headers=auth(),
                            json={"nodes": [a["node_id"], b["node_id"]], "pipeline_parallel_size": 2})
        assert response.status_code == 409 and response.json["error"]["code"] == "unsupported_plan", response.json
