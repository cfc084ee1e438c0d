"""Token lifecycle: a rotated admin token revokes its predecessor, tokens expire, revoking a join
or worker token removes its nodes, and the join token rotates live."""

from __future__ import annotations

from sqlalchemy import text

from nexus.auth import ensure_bootstrap_admin, ensure_bootstrap_join, hash_token
from tests.agent_support import beat, register
from tests.conftest import auth
from tests.support import ADMIN_TOKEN, JOIN_TOKEN


def test_rotating_the_admin_token_revokes_the_previous_bootstrap_token(api, services):
    assert api.get("/api/v1/tokens", headers=auth()).status_code == 200
    ensure_bootstrap_admin(services.engine, "nx_rotated-admin-token-0123456789")  # what a restart with a new value does
    assert api.get("/api/v1/tokens", headers=auth()).status_code == 401
    assert api.get("/api/v1/tokens", headers=auth("nx_rotated-admin-token-0123456789")).status_code == 200
    ensure_bootstrap_admin(services.engine, "nx_rotated-admin-token-0123456789")  # idempotent
    assert api.get("/api/v1/tokens", headers=auth("nx_rotated-admin-token-0123456789")).status_code == 200


def test_an_expired_token_gets_401(api, services):
    created = api.post("/api/v1/tokens", json={"name": "ci", "role": "submitter", "expires_in_seconds": 3600},
                       headers=auth())
    assert created.status_code == 201 and created.json["expires_at"] is not None
    assert api.get("/api/v1/jobs", headers=auth(created.json["token"])).status_code == 200
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = :id"),
                     {"id": created.json["id"]})
    refused = api.get("/api/v1/jobs", headers=auth(created.json["token"]))
    assert refused.status_code == 401 and "expired" in refused.json["error"]["message"]
    never = api.post("/api/v1/tokens", json={"name": "forever", "role": "submitter"}, headers=auth()).json
    assert never["expires_at"] is None
    bad = api.post("/api/v1/tokens", json={"name": "x", "role": "submitter", "expires_in_seconds": 0}, headers=auth())
    assert bad.status_code == 400


def test_revoking_a_worker_token_stops_the_nodes_registered_with_it(api):
    created = api.post("/api/v1/tokens", json={"name": "rack-3", "role": "worker"}, headers=auth()).json
    node = register(api, "rack3-a", token=created["token"]).json
    other = register(api, "elsewhere").json  # joined with the cluster's join token
    assert beat(api, node).status_code == 200
    revoked = api.delete(f"/api/v1/tokens/{created['id']}", headers=auth())
    assert revoked.status_code == 200 and revoked.json["nodes_removed"] == 1
    assert beat(api, node).status_code == 401
    assert beat(api, other).status_code == 200


def test_a_rotated_join_token_admits_new_nodes_and_the_old_one_is_refused(api, services):
    before = register(api, "joined-before").json
    rotated = api.post("/api/v1/tokens/join/rotate", headers=auth())
    assert rotated.status_code == 201 and rotated.json["kind"] == "join"
    assert register(api, "joined-after", token=rotated.json["token"]).status_code == 201
    assert register(api, "too-late", token=JOIN_TOKEN).status_code == 401
    assert beat(api, before).status_code == 200  # rotation retires the token, not the nodes it admitted
    ensure_bootstrap_join(services.engine, JOIN_TOKEN)  # a restart with the old env value does not revive it
    assert register(api, "too-late", token=JOIN_TOKEN).status_code == 401
    # Revoking the old join token stops the node that joined with it.
    with services.engine.connect() as conn:
        old_id = conn.execute(text("SELECT id FROM api_tokens WHERE token_hash = :h"),
                              {"h": hash_token(JOIN_TOKEN)}).scalar_one()
    assert api.delete(f"/api/v1/tokens/{old_id}", headers=auth()).json["nodes_removed"] == 1
    assert beat(api, before).status_code == 401


def test_a_join_token_is_no_api_credential(api):
    assert api.get("/api/v1/nodes", headers=auth(JOIN_TOKEN)).status_code == 401
    assert api.get("/api/v1/nodes", headers=auth(ADMIN_TOKEN)).status_code == 200
