"""Every route x every caller gets exactly the answer the policy below says.

The routes come from the app's URL map, so a route added later without an entry
in POLICY fails `test_every_route_has_a_policy`: deciding who may call it is
part of adding it.
"""

from __future__ import annotations

import uuid

import pytest

from nexus import auth
from nexus.auth import Role
from tests.agent_support import beat, registered
from tests.conftest import auth as bearer

pytestmark = pytest.mark.timeout(120)

PUBLIC, ANY, SUBMITTER, WORKER, ADMIN, OWN_TOKEN = "public", "any", "submitter", "worker", "admin", "own token"

# Who may call what. ANY: every valid API token; SUBMITTER: submitters and admins; WORKER: workers and
# admins; ADMIN: admins only; OWN_TOKEN: the route checks a join, node or lease token itself (tested below).
POLICY = {
    "health.healthz": PUBLIC, "openapi.spec": PUBLIC, "openapi.docs": PUBLIC,
    "static": PUBLIC,
    "console.bare": PUBLIC, "console.page": PUBLIC, "console.asset": PUBLIC,  # static files; the data needs a token
    "tokens.whoami": ANY,
    "openapi.swagger_ui_oauth_redirect": ANY,  # Swagger UI's OAuth helper page: no data, but not exempted
    "health.metrics": ADMIN,
    "tokens.create": ADMIN, "tokens.list_tokens": ADMIN, "tokens.revoke": ADMIN, "tokens.rotate_join": ADMIN,
    "jobs.submit": SUBMITTER, "jobs.submit_bulk": SUBMITTER, "jobs.cancel": SUBMITTER, "jobs.retry": SUBMITTER,
    "jobs.get_job": ANY, "jobs.list_jobs": ANY, "jobs.job_events": ANY,
    "inputs.upload": SUBMITTER,
    "nodes.register": OWN_TOKEN, "nodes.heartbeat": OWN_TOKEN,
    "leases.read": OWN_TOKEN, "leases.write": OWN_TOKEN,  # a job's lease token (test_worker_credentials too)
    "nodes.list_nodes": ADMIN, "nodes.get_node": ADMIN, "nodes.drain": ADMIN, "nodes.resume": ADMIN,
    "nodes.patch": ADMIN, "nodes.remove": ADMIN,
    "cluster.cluster": SUBMITTER, "gpu.can_fit": SUBMITTER,
    "gpu.reserve": ADMIN, "gpu.list_reservations": ADMIN, "gpu.release": ADMIN,
    "models.create_model": ADMIN, "models.delete_model": ADMIN, "models.deploy": ADMIN, "models.stop_instance": ADMIN,
    "models.list_models": ANY, "models.get_model": ANY, "models.list_instances": ANY,
    "models.report_state": WORKER,
    "openai.list_models": ANY, "openai.get_model": ANY, "openai.completions": SUBMITTER,
    "openai.chat_completions": SUBMITTER, "openai.embeddings": SUBMITTER,
    "proofs.submit": SUBMITTER, "proofs.verify": SUBMITTER, "proofs.get_proof": ANY, "proofs.weights": ANY,
    "benchmarks.submit": SUBMITTER, "benchmarks.list_benchmarks": ANY, "benchmarks.get_benchmark": ANY,
    "benchmarks.get_plot": ANY,
}
# Routes about one job: another tenant's submitter must not learn it exists.
TENANT_SCOPED = {"jobs.get_job", "jobs.job_events", "jobs.cancel", "jobs.retry"}
ALLOWED = {PUBLIC: {"none", "wrong", "revoked", "worker", "other_tenant", "admin"},
           ANY: {"worker", "other_tenant", "admin"}, SUBMITTER: {"other_tenant", "admin"},
           WORKER: {"worker", "admin"}, ADMIN: {"admin"}}
CALLERS = ("none", "wrong", "revoked", "worker", "other_tenant", "admin")


def routes(app):
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def test_every_route_has_a_policy(app):
    missing = sorted({rule.endpoint for rule, _ in routes(app)} - set(POLICY))
    assert not missing, f"routes with no access policy (add them to POLICY): {missing}"


@pytest.fixture
def tokens(services):
    with services.engine.begin() as conn:
        made = {name: auth.create_token(conn, name, role, tenant)[0] for name, role, tenant in (
            ("worker", Role.WORKER, "default"), ("other_tenant", Role.SUBMITTER, "tenant-b"),
            ("revoked", Role.ADMIN, "default"), ("owner", Role.SUBMITTER, "tenant-a"))}
        revoked_id = next(t["id"] for t in auth.list_tokens(conn) if t["name"] == "revoked")
        auth.revoke_token(conn, revoked_id)
    from tests.support import ADMIN_TOKEN

    return {**made, "admin": ADMIN_TOKEN, "wrong": "nx_" + uuid.uuid4().hex}


@pytest.fixture
def owned_job(api, tokens) -> str:
    response = api.post("/api/v1/jobs", json={"type": "noop", "requirements": {"tier": "gpu_peer"}},
                        headers=bearer(tokens["owner"]))
    assert response.status_code == 201
    return response.json["id"]


def url_for(rule, job_id: str) -> str:
    values = {}
    for name, converter in ((a, rule._converters[a]) for a in rule.arguments):
        kind = type(converter).__name__
        values[name] = job_id if name == "job_id" else str(uuid.uuid4()) if kind == "UUIDConverter" else "x"
    return rule.build(values, append_unknown=False)[1]


def test_every_route_answers_every_caller_as_the_policy_says(app, api, tokens, owned_job):
    wrong = []
    for rule, method in routes(app):
        policy = POLICY.get(rule.endpoint)
        if policy in (None, OWN_TOKEN):
            continue
        url = url_for(rule, owned_job)
        for who in CALLERS:
            headers = {} if who == "none" else bearer(tokens[who])
            status = api.open(url, method=method, json={}, headers=headers).status_code
            expected = expected_status(policy, who, rule.endpoint)
            if not matches(status, expected):
                wrong.append(f"{method} {rule.rule} as {who}: {status}, expected {expected}")
    assert not wrong, "\n".join(wrong)


def expected_status(policy: str, who: str, endpoint: str) -> str | int:
    if who in ALLOWED[policy]:
        return 404 if who == "other_tenant" and endpoint in TENANT_SCOPED else "allowed"
    return 401 if who in ("none", "wrong", "revoked") else 403


def matches(status: int, expected) -> bool:
    if expected == "allowed":  # past authentication and authorisation; input checks may still say no
        return status not in (401, 403) and status < 500
    return status == expected


def test_listing_jobs_shows_a_submitter_only_its_tenant(api, tokens, owned_job):
    theirs = api.get("/api/v1/jobs", headers=bearer(tokens["other_tenant"])).json["jobs"]
    assert owned_job not in {j["id"] for j in theirs}
    snooping = api.get("/api/v1/jobs?tenant=tenant-a", headers=bearer(tokens["other_tenant"])).json["jobs"]
    assert owned_job not in {j["id"] for j in snooping}
    assert owned_job in {j["id"] for j in api.get("/api/v1/jobs", headers=bearer(tokens["owner"])).json["jobs"]}


def test_a_submitter_cannot_submit_for_another_tenant(api, tokens):
    response = api.post("/api/v1/jobs", json={"type": "noop", "tenant": "tenant-a"},
                        headers=bearer(tokens["other_tenant"]))
    assert response.status_code == 403


def test_register_needs_the_join_token_or_a_worker_token(api, tokens, services):
    from tests.agent_support import register

    for who in ("none", "wrong", "revoked", "other_tenant", "admin"):
        response = register(api, f"intruder-{who}", token=tokens.get(who, ""))
        assert response.status_code == 401, (who, response.json)
    assert register(api, "legit-by-worker-token", token=tokens["worker"]).status_code == 201


def test_a_node_token_cannot_act_as_another_node(api, services):
    alice, bob = registered(api, "sec-alice"), registered(api, "sec-bob")
    assert beat(api, alice).status_code == 200
    impostor = beat(api, bob, token=alice["node_token"])
    assert impostor.status_code == 401 and impostor.json["error"]["code"] == "unauthorized"
    assert beat(api, alice, token=bob["node_token"]).status_code == 401
    assert beat(api, alice, token="nxn_" + uuid.uuid4().hex).status_code == 401
    assert api.post(f"/api/v1/nodes/{alice['node_id']}/heartbeat", json={}).status_code in (400, 401)


def test_no_api_token_opens_a_jobs_objects(api, tokens, owned_job, services):
    """The lease routes take only the running attempt's lease token: no API token, the admin's included."""
    services.store.put_bytes(services.settings.bucket_outputs, f"jobs/{owned_job}/output", b"x")
    for who in CALLERS:
        headers = bearer(tokens[who]) if who in tokens else {}
        path = f"/api/v1/leases/{owned_job}/1/objects/outputs/jobs/{owned_job}/output"
        assert api.get(path, headers=headers).status_code in (401, 403), who
        assert api.put(path, data=b"forged", headers=headers).status_code in (401, 403), who
    assert services.store.get_bytes(services.settings.bucket_outputs, f"jobs/{owned_job}/output") == b"x"
