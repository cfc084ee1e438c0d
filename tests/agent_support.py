"""Helpers for the node agent's tests: hardware fixtures and register/heartbeat calls through the real API."""

from __future__ import annotations

import json
import time
from pathlib import Path

from nexus.nodes.hardware import NodeHardware
from nexus.agent.heartbeat import heartbeat_body, registration_body
from nexus.nodes.tiers import TierThresholds, plan_workers
from nexus.config import Settings
from tests.conftest import auth
from tests.support import JOIN_TOKEN

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
FIXTURE_NAMES = sorted(path.stem for path in FIXTURES.glob("*.json"))


def hardware(name: str) -> NodeHardware:
    return NodeHardware.from_dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def register(api, name: str, fixture: str = "cpu_only", token: str = JOIN_TOKEN, settings: Settings | None = None):
    """POST /nodes/register with the body the agent sends; returns the response."""
    hw = hardware(fixture)
    thresholds = TierThresholds.from_settings(settings or Settings())
    queues = sorted({q for plan in plan_workers(hw, thresholds, False) for q in plan.queues})
    body = registration_body(hw, name, queues)
    return api.post("/api/v1/nodes/register", json=body, headers=auth(token))


def registered(api, name: str, fixture: str = "cpu_only") -> dict:
    response = register(api, name, fixture)
    assert response.status_code == 201, response.json
    return response.json


def beat(api, node: dict, fixture: str = "cpu_only", state: str = "ready", token: str | None = None,
         running_jobs=(), loaded_models=()):
    body = heartbeat_body(hardware(fixture), state=state, running_jobs=list(running_jobs),
                          loaded_models=list(loaded_models), workers=[], cpu_percent=12.5, sent_at=time.time())
    return api.post(f"/api/v1/nodes/{node['node_id']}/heartbeat", json=body, headers=auth(token or node["node_token"]))


class ApiClient:
    """The API over HTTP with a token: `api("GET", path, expect=200)` answers the JSON, asserting the status."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {token}"}

    def __call__(self, method: str, path: str, expect: int | None = None, **kw):
        import requests

        response = requests.request(method, self.url + path, headers=self.headers, timeout=30, **kw)
        assert response.status_code == expect if expect else response.status_code < 300, response.text
        return response.json()
