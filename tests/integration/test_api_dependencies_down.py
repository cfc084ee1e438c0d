"""A dependency that is down gives 503 with a clear JSON error, never a 500, and keeps nothing half-written."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from nexus.api import create_app
from nexus.localservers import free_port
from nexus.services import Services
from tests.conftest import auth

pytestmark = pytest.mark.timeout(60)


def test_broker_down_gives_503_and_leaves_no_row(services):
    broken = services.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    api = create_app(broken, Services(broken)).test_client()
    response = api.post("/api/v1/jobs", json={"type": "noop"}, headers=auth())
    assert response.status_code == 503
    assert response.json["error"]["code"] == "unavailable"
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    health = api.get("/healthz")
    assert health.status_code == 503
    assert health.json["dependencies"]["broker"]["ok"] is False
    assert health.json["dependencies"]["database"]["ok"] is True


def test_database_down_gives_503(services):
    broken = services.settings.model_copy(
        update={"database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nexus"})
    api = create_app(broken, Services(broken)).test_client()
    response = api.get("/api/v1/jobs", headers=auth())
    assert response.status_code == 503
    assert response.json["error"]["details"] == {"dependency": "database"}
    assert api.get("/healthz").json["dependencies"]["database"]["ok"] is False
