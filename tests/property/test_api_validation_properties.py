"""Generated input for every route: the answer is a success or a 4xx JSON error, never a 5xx.

Routes come from the app's URL map, so routes added later are fuzzed too.
Bodies are arbitrary JSON, objects built from the field names our request
models use (to get past the first check), and bytes that are not JSON at all.
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from tests.conftest import auth

pytestmark = pytest.mark.timeout(300)

SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20) | \
    st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)
FIELDS = ["type", "payload", "jobs", "name", "role", "tenant", "priority", "max_attempts", "idempotency_key",
          "input_key", "requirements", "hardware", "agent_version", "queues", "state", "model", "messages",
          "prompt", "max_tokens", "stream", "seconds", "echo", "fail_attempts", "labels", "max_concurrent",
          "required_mb", "tier", "gpu", "min_vram_mb", "kind", "replicas", "temperature", "n", "content"]
FIELD_VALUES = SCALARS | st.sampled_from(["noop", "sleep", "submitter", "admin", "cpu_only", "gpu_peer", "tiny",
                                          "ready", "draining", "user"]) | JSON
OBJECTS = st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=6)
BODIES = st.one_of(
    st.builds(lambda v: ("json", v), JSON),
    st.builds(lambda v: ("json", v), OBJECTS),
    st.builds(lambda v: ("json", {"jobs": v}), st.lists(OBJECTS, max_size=3)),
    st.builds(lambda v: ("raw", v), st.binary(max_size=64)),
    st.just(("none", None)),
)
QUERY_KEYS = ["state", "limit", "cursor", "type", "tenant", "parent_id", "tier", "has_gpu", "model", "name"]
QUERIES = st.dictionaries(st.sampled_from(QUERY_KEYS), st.text(max_size=12) | st.integers(-5, 2000).map(str),
                          max_size=3)
NAMES = st.sampled_from(["tiny", "x", "a/b", "..", "%00"]) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#%"), min_size=1, max_size=20)


@pytest.fixture
def fuzz_app(services):
    from nexus.api import create_app

    # Inference requests give up quickly here: a generated body naming a served model must not hang the run.
    return create_app(services.settings.model_copy(update={"inference_request_timeout_seconds": 2.0}), services)


def routes(app):
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def build_url(rule, draw_uuid, draw_name, job_id: str) -> str:
    values = {}
    for name in rule.arguments:
        kind = type(rule._converters[name]).__name__
        if kind == "UUIDConverter":
            values[name] = draw_uuid(job_id)
        elif kind == "IntegerConverter":  # an attempt number: 1 exists for a started job, the others not
            values[name] = len(draw_name) % 3
        else:
            values[name] = draw_name
    return rule.build(values, append_unknown=False)[1]


def error_keys(path: str) -> set[str]:
    """Nexus' error shape; the OpenAI-compatible /v1 routes answer OpenAI's, which its SDK parses."""
    return {"message", "type"} if path.startswith("/v1/") else {"code", "message", "details"}


def test_generated_requests_get_success_or_a_json_4xx(fuzz_app, api, services):
    client = fuzz_app.test_client()
    job_id = api.post("/api/v1/jobs", json={"type": "noop", "requirements": {"tier": "gpu_peer"}},
                      headers=auth()).json["id"]
    problems = []
    for rule, method in routes(fuzz_app):
        if rule.endpoint.startswith("openapi.") or rule.endpoint == "static":
            continue

        @hypothesis_settings(max_examples=20, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
        @given(body=BODIES, query=QUERIES, existing=st.booleans(), name=NAMES)
        def answers_cleanly(body, query, existing, name):
            url = build_url(rule, lambda known: known if existing else str(uuid.uuid4()), name, job_id)
            kind, value = body
            kwargs = {"json": value} if kind == "json" else {"data": value, "content_type": "application/json"} \
                if kind == "raw" else {}
            response = client.open(url, method=method, query_string=query, headers=auth(), **kwargs)
            described = f"{method} {url} query={query} body={kind}:{str(value)[:200]} -> {response.status_code}"
            assert response.status_code < 500, described + " " + response.get_data(as_text=True)[:300]
            if response.status_code >= 400:
                error = json.loads(response.get_data(as_text=True)).get("error")
                assert isinstance(error, dict) and error_keys(rule.rule) <= set(error), described

        try:
            answers_cleanly()
        except AssertionError as failure:
            problems.append(str(failure).splitlines()[0][:600])
    assert not problems, "\n".join(problems)
