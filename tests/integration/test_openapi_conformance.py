"""The OpenAPI document tells the truth: schemathesis fuzzes a live API and checks every answer against it.

Against the session's API process (gunicorn, the real error handlers), for the job, model, cluster,
node, token, GPU, proof and input routes: each response's status is documented, its body matches the documented schema (the answer
models for 2xx, the `{"error": {code, message, details}}` shape for errors), no 5xx, documented
methods only, schema-violating requests refused. One check is left out: schemathesis expects every
schema-valid request to be accepted, but a job's type, a model's name or an input key are checked
against the database, which no schema can say. An answer may take up to a long-poll's wait
(`?wait=`, at most 30 s). Rotating the join token is left out: the session's other tests register
nodes with it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

pytestmark = pytest.mark.timeout(600)


def test_the_api_answers_as_its_openapi_document_says(live_api, tmp_path):
    url, token = live_api
    spec = requests.get(url + "/openapi.json", timeout=10).json()
    job_answer = spec["paths"]["/api/v1/jobs"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert job_answer == {"$ref": "#/components/schemas/JobView"}
    error = spec["components"]["schemas"]["HTTPError"]
    assert set(error["properties"]["error"]["properties"]) == {"code", "message", "details"}
    for path, method, status in [("/api/v1/nodes", "get", "200"), ("/api/v1/nodes/register", "post", "201"),
                                 ("/api/v1/tokens", "post", "201"), ("/api/v1/gpu/can-fit", "post", "200"),
                                 ("/api/v1/cluster", "get", "200"), ("/api/v1/proofs", "post", "201"),
                                 ("/api/v1/inputs", "post", "201")]:
        answer = spec["paths"][path][method]["responses"][status]
        assert answer["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/"), path

    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "-H", f"Authorization: Bearer {token}",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--include-path-regex", "^/api/v1/(jobs|models|cluster|nodes|tokens|gpu|proofs|inputs)",
         "--exclude-path-regex", "^/api/v1/tokens/join/rotate$",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "15", "--seed", "7",
         "--request-timeout", "45", "--max-response-time", "45", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)  # its cache stays out of the checkout
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_the_document_refuses_what_the_api_refuses(api, admin_headers):
    """A JSON body that is not an object is refused, even where every field has a default."""
    for body in ("null", "[]", "3"):
        answer = api.post("/api/v1/models/m/instances", data=body, headers={**admin_headers,
                                                                              "Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json["error"]["message"] == "the body must be a JSON object"
    routes = {rule.rule for rule in api.application.url_map.iter_rules() if "OPTIONS" in rule.methods}
    assert "/api/v1/models/<model_name:name>" in routes
    options = api.open("/api/v1/models/m/instances", method="OPTIONS", headers=admin_headers)
    assert set(options.headers["Allow"].split(", ")) == {"GET", "POST", "HEAD", "OPTIONS"}
