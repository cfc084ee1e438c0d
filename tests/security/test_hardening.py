"""Hostile messages, Flower's auth, production secrets, presigned URL expiry, token storage and logs."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
import requests
from pydantic import ValidationError
from sqlalchemy import text

from nexus import auth
from nexus.config import Settings
from nexus.localservers import free_port
from nexus.storage import make_object_store
from tests.conftest import auth as bearer
from tests.support import ADMIN_TOKEN, NexusProcess, settings_env, wait_for

pytestmark = pytest.mark.timeout(120)


class _RunsACommand:
    """Unpickling this runs a shell command: what a pickled Celery message could do to a worker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def kombu_envelope(body: bytes, content_type: str, queue: str) -> str:
    """A raw message as kombu's Redis transport stores it, claiming to be a nexus.run_job task."""
    task_id = str(uuid.uuid4())
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "binary", "content-type": content_type,
        "headers": {"lang": "py", "task": "nexus.run_job", "id": task_id, "root_id": task_id, "retries": 0,
                    "argsrepr": "()", "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                       "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    })


def test_pickled_and_yaml_messages_are_refused_without_running(services, worker, session_dir):
    marker = session_dir / f"pwned-{uuid.uuid4().hex}"
    hostile = {
        "application/x-python-serialize": pickle.dumps(((_RunsACommand(marker),), {}, {})),
        "application/x-yaml": f"!!python/object/apply:os.system ['touch {marker}']".encode(),
    }
    for content_type, body in hostile.items():
        services.redis.lpush("cpu_only", kombu_envelope(body, content_type, "cpu_only"))
    wait_for(lambda: services.redis.llen("cpu_only") == 0, timeout=30, what="the worker took the messages")
    wait_for(lambda: worker.log_text().count("ContentDisallowed") >= 2 or
             worker.log_text().count("Refusing to deserialize") >= 2, timeout=30, what="both refusals logged")
    assert not marker.exists(), "a hostile message was deserialized and ran"
    # The worker goes on consuming after refusing them.
    [(job, _)] = services.submitter.submit_many([{"type": "noop"}], "default")
    wait_for(lambda: _state(services, job.id) == "succeeded", timeout=30, what="a job after the refusals")


def _state(services, job_id) -> str:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def test_flower_api_needs_basic_auth(settings, session_dir):
    password = "flower-" + uuid.uuid4().hex
    flower_settings = settings.model_copy(update={"flower_port": free_port(), "flower_password": password})
    flower = NexusProcess(flower_settings, ["flower"], session_dir, "flower").start()
    url = f"http://127.0.0.1:{flower_settings.flower_port}"
    try:
        wait_for(lambda: _answers(url + "/healthcheck"), timeout=60, what="Flower up")
        assert requests.get(url + "/api/workers", timeout=10).status_code == 401
        assert requests.get(url + "/api/workers", auth=("admin", "wrong"), timeout=10).status_code == 401
        assert requests.get(url + "/", timeout=10).status_code == 401
        assert requests.get(url + "/api/workers", auth=(flower_settings.flower_user, password),
                            timeout=30).status_code == 200
    finally:
        flower.stop()
    assert password not in flower.log_text()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("name", ["admin_token", "join_token", "flower_password", "s3_secret_key"])
@pytest.mark.parametrize("value", ["", "changeme", "nexus-dev-admin-token", "short"])
def test_production_refuses_default_or_empty_secrets(name, value):
    strong = {n: "s3cret-" + uuid.uuid4().hex for n in ("admin_token", "join_token", "flower_password",
                                                         "s3_secret_key", "worker_database_password",
                                                         "worker_redis_password")}
    strong.update(database_url="postgresql+psycopg2://nexus:" + uuid.uuid4().hex + "@db/nexus",
                  redis_url="redis://:" + uuid.uuid4().hex + "@redis:6379/0")
    Settings(mode="production", **strong)  # strong values pass
    with pytest.raises(ValidationError, match=f"NEXUS_{name.upper()}"):
        Settings(mode="production", **{**strong, name: value})


def test_the_master_will_not_start_in_production_with_default_secrets(settings):
    env = {**os.environ, **settings_env(settings), "NEXUS_MODE": "production",
           "NEXUS_ADMIN_TOKEN": "nexus-dev-admin-token"}
    result = subprocess.run([sys.executable, "-m", "nexus", "master"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "Error: refusing to start: production mode refuses" in result.stderr
    assert "NEXUS_ADMIN_TOKEN" in result.stderr and "Traceback" not in result.stderr
    assert "nexus-dev-admin-token" not in result.stderr  # it names the variable, never echoes the value


def test_presigned_urls_expire(settings, services):
    store = make_object_store(settings)
    store.put_bytes(settings.bucket_outputs, "expiring/object", b"secret result")
    url = store.presigned_get(settings.bucket_outputs, "expiring/object", expires=timedelta(seconds=2))
    assert requests.get(url, timeout=10).content == b"secret result"
    time.sleep(3.5)
    assert requests.get(url, timeout=10).status_code == 403
    tampered = url.replace("expiring/object", "expiring/other")
    assert requests.get(tampered, timeout=10).status_code == 403


def test_tokens_are_stored_hashed_and_never_logged(services, live_api, worker, session_dir):
    url, _ = live_api
    created = requests.post(url + "/api/v1/tokens", json={"name": "log-check", "role": "submitter"},
                            headers=bearer(ADMIN_TOKEN), timeout=10).json()
    token = created["token"]
    job = requests.post(url + "/api/v1/jobs", json={"type": "noop"}, headers=bearer(token), timeout=10).json()
    done = requests.get(f"{url}/api/v1/jobs/{job['id']}?wait=20", headers=bearer(token), timeout=30).json()
    assert done["state"] == "succeeded"
    requests.get(url + "/api/v1/jobs", headers=bearer("nx_" + "wrong" * 8), timeout=10)  # a failed login too
    with services.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(text("SELECT * FROM api_tokens")).mappings()]
    stored = next(r for r in rows if r["name"] == "log-check")
    assert stored["token_hash"] == auth.hash_token(token) and stored["prefix"] == token[:8]
    for row in rows:
        assert not any(isinstance(v, str) and (token in v or ADMIN_TOKEN in v) for v in row.values())
    logs = {path.name: path.read_text(errors="replace") for path in session_dir.glob("*.log")}
    assert logs, "no logs to check"
    for name, content in logs.items():
        for secret in (token, ADMIN_TOKEN, token[8:], "wrong" * 8):
            assert secret not in content, f"a token appears in {name}"
    with services.engine.connect() as conn:  # a stolen hash is not a token
        assert auth.authenticate(conn, stored["token_hash"]) is None
