"""A deploy names its nodes by id or by name; a name no live node has is a 400 that says which."""

from __future__ import annotations

import pytest

from tests.agent_support import beat, registered
from tests.conftest import auth

pytestmark = pytest.mark.timeout(120)


def _ready(api, name: str, fixture: str) -> str:
    node = registered(api, name, fixture)
    assert beat(api, node, fixture).status_code == 200
    return node["node_id"]


def test_a_deploy_takes_node_names_and_ids(api, services):
    cpu_a, cpu_b = _ready(api, "cpu-a", "cpu_only"), _ready(api, "cpu-b", "cpu_only")
    gpu = _ready(api, "gpu-box", "rtx4090")
    assert api.post("/api/v1/models", json={"name": "m", "source": "/models/m"}, headers=auth()).status_code == 201
    assert api.post("/api/v1/models", json={"name": "big", "source": "/models/big", "backend": "vllm",
                                             "vram_mb": 10_000}, headers=auth()).status_code == 201

    by_name = api.post("/api/v1/models/m/instances", json={"nodes": ["cpu-b"]}, headers=auth())
    assert by_name.status_code == 201 and by_name.json["node_id"] == cpu_b, by_name.json
    by_id = api.post("/api/v1/models/m/instances", json={"nodes": [cpu_a]}, headers=auth())
    assert by_id.status_code == 201 and by_id.json["node_id"] == cpu_a
    on_gpu = api.post("/api/v1/models/big/instances", json={"nodes": ["gpu-box"]}, headers=auth())
    assert on_gpu.status_code == 201 and on_gpu.json["node_id"] == gpu

    unknown = api.post("/api/v1/models/m/instances", json={"nodes": ["cpu-b", "nowhere"]}, headers=auth())
    assert unknown.status_code == 400
    assert unknown.json["error"]["details"] == {"field": "nodes", "unknown": ["nowhere"]}
