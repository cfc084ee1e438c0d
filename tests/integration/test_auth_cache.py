"""The API's token and model caches: one database lookup per token (model) and TTL, not one per request (the gevent API
opens thousands of requests at once), and a revocation through the API refuses the token at once."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from tests.conftest import auth
from tests.integration.test_api_limits import limited

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def lookups(services):
    seen = []

    def count(conn, cursor, statement, *_):
        if "FROM api_tokens WHERE token_hash" in statement:
            seen.append(statement)

    event.listen(services.statements, "before_cursor_execute", count)
    yield seen
    event.remove(services.statements, "before_cursor_execute", count)


def test_a_token_is_looked_up_once_per_ttl_and_refused_at_once_when_revoked(services, lookups):
    _, api = limited(services, auth_cache_seconds=30)
    created = api.post("/api/v1/tokens", json={"name": "crowd", "role": "submitter"}, headers=auth()).json
    before = len(lookups)
    for _ in range(20):
        assert api.get("/api/v1/jobs", headers=auth(created["token"])).status_code == 200
    assert len(lookups) - before == 1, "one lookup for twenty requests"
    assert api.delete(f"/api/v1/tokens/{created['id']}", headers=auth()).status_code == 200
    refused = api.get("/api/v1/jobs", headers=auth(created["token"]))
    assert refused.status_code == 401


def test_an_unknown_token_is_looked_up_every_time(services, lookups):
    _, api = limited(services, auth_cache_seconds=30)
    for _ in range(3):
        assert api.get("/api/v1/jobs", headers=auth("nx_unknown-token-0123456789")).status_code == 401
    assert len(lookups) == 3


def test_v1_requests_read_a_models_catalog_entry_once_per_ttl(services, tmp_path):
    from nexus.models import catalog
    from nexus.models.catalog import ModelSpec

    with services.engine.begin() as conn:
        catalog.insert_model(conn, ModelSpec(name="cached-model", source=str(tmp_path), max_model_len=64))
    reads = []

    def count(conn, cursor, statement, *_):
        if "FROM models WHERE name" in statement:
            reads.append(statement)

    event.listen(services.statements, "before_cursor_execute", count)
    try:
        _, api = limited(services, inference_catalog_cache_seconds=30)
        for _ in range(5):  # nobody serves it: 503 at once, after the catalog check
            answer = api.post("/v1/completions", json={"model": "cached-model", "prompt": "x"}, headers=auth())
            assert answer.status_code == 503, answer.json
        assert len(reads) == 1
    finally:
        event.remove(services.statements, "before_cursor_execute", count)
