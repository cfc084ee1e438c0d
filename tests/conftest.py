"""Fixtures over real services: PostgreSQL, Redis, an S3 server and real Celery workers.

    settings    Settings pointing at this session's servers (short leases and backoffs)
    services    nexus.services.Services for those settings (engine, celery, redis, store, submitter)
    app/api     the Flask app and its test client; `auth(token)` builds headers
    worker      one real `nexus worker` process for the session, with a worker's credentials (and live_api,
                through which its jobs reach their objects)
    verifier    the master's own worker (`nexus verifier`): proofs' verdicts
    live_api    a real gunicorn API process: (url, admin token)
Tables and Redis are emptied before each test that uses `services`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import make_url

from nexus.auth import hash_token
from nexus.config import Settings
from nexus.credentials import API_REDIS_USER, RECONCILER_REDIS_USER, WORKER_REDIS_USER, service_redis_acl, worker_redis_acl
from nexus.db.engine import dispose_engines
from nexus.localservers import PostgresServer, RedisServer, S3Server, free_port
from nexus.localservers.s3 import ScopedKey
from nexus.master import prepare_master
from nexus.services import Services
from tests.support import (ADMIN_TOKEN, API_REDIS_PASSWORD, JOIN_TOKEN, RECONCILER_REDIS_PASSWORD, S3_ACCESS,
                           S3_SECRET, WORKER_REDIS_PASSWORD, WORKER_S3_ACCESS, WORKER_S3_SECRET, NexusProcess,
                           port_open, start_api, start_worker)

SYSTEM_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nexus")


@pytest.fixture(scope="session")
def postgres_url(session_dir):
    """A fresh database for this session: on the system server when it answers, else our own server."""
    server = None
    if port_open("127.0.0.1", 5432):
        admin_url = SYSTEM_PG
    else:
        server = PostgresServer(session_dir / "postgres").start()
        admin_url = server.url
    name = f"nexus_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield str(make_url(admin_url).set(database=name).render_as_string(hide_password=False))
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    if server:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(session_dir):
    # With the workers', the API's and the reconciler's ACL users, so every test's processes use the broker
    # as their own credentials allow.
    users = {WORKER_REDIS_USER: worker_redis_acl(WORKER_REDIS_PASSWORD),
             API_REDIS_USER: service_redis_acl(API_REDIS_PASSWORD),
             RECONCILER_REDIS_USER: service_redis_acl(RECONCILER_REDIS_PASSWORD)}
    with RedisServer(session_dir / "redis", users=users) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(session_dir):
    # With the workers' scoped key (Settings.worker_bucket_actions), which every test's workers hold.
    worker_key = ScopedKey("nexus-worker", WORKER_S3_ACCESS, WORKER_S3_SECRET, Settings().worker_bucket_actions())
    with S3Server(session_dir / "s3", access_key=S3_ACCESS, secret_key=S3_SECRET, scoped_keys=[worker_key]) as server:
        yield server


@pytest.fixture(scope="session")
def settings(postgres_url, redis_server, s3_server, session_dir) -> Settings:
    settings = Settings(
        database_url=postgres_url, redis_url=redis_server.url, s3_endpoint=s3_server.endpoint,
        s3_access_key=S3_ACCESS, s3_secret_key=S3_SECRET, admin_token=ADMIN_TOKEN, join_token=JOIN_TOKEN,
        worker_redis_password=WORKER_REDIS_PASSWORD, api_redis_password=API_REDIS_PASSWORD,
        reconciler_redis_password=RECONCILER_REDIS_PASSWORD,
        worker_s3_access_key=WORKER_S3_ACCESS, worker_s3_secret_key=WORKER_S3_SECRET,
        api_port=free_port(), node_api_port=free_port(), data_dir=session_dir / "data",
        job_lease_seconds=3.0, job_heartbeat_seconds=0.5, retry_backoff_base_seconds=0.2,
        retry_backoff_max_seconds=1.0, reconcile_interval_seconds=0.5,
        worker_send_events=False, cluster_file=session_dir / "cluster.json",
        # Tests change tokens in the database and expect the next request to see it; the cache has its own test.
        auth_cache_seconds=0, inference_catalog_cache_seconds=0,
    )
    prepare_master(settings)
    return settings


@pytest.fixture(scope="session")
def session_services(settings) -> Services:
    return Services(settings)


@pytest.fixture
def services(session_services) -> Services:
    """Services over emptied tables and an emptied Redis."""
    reset_state(session_services)
    return session_services


def reset_state(services: Services, attempts: int = 5) -> None:
    """Empty every table but the schema version and the session's admin and join tokens, and Redis.

    Session processes (workers, agents, the reconciler) keep writing meanwhile, so
    TRUNCATE can deadlock with them: PostgreSQL then aborts one side; we try again.
    """
    for attempt in range(1, attempts + 1):
        try:
            _truncate(services)
            break
        except DBAPIError as exc:
            if "deadlock" not in str(exc) or attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
    services.redis.flushdb()


def _truncate(services: Services) -> None:
    with services.engine.begin() as conn:
        tables = [r[0] for r in conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT IN "
            "('alembic_version', 'api_tokens')"))]
        if tables:
            conn.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE"))
        # The session's admin and join tokens stay, usable again if a test rotated or revoked them.
        session_tokens = {"h": [hash_token(ADMIN_TOKEN), hash_token(JOIN_TOKEN)]}
        conn.execute(text("DELETE FROM api_tokens WHERE NOT (token_hash = ANY(:h))"), session_tokens)
        conn.execute(text("UPDATE api_tokens SET revoked_at = NULL, expires_at = NULL WHERE token_hash = ANY(:h)"),
                     session_tokens)


@pytest.fixture
def app(services):
    from nexus.api import create_app

    return create_app(services.settings, services)


@pytest.fixture
def api(app):
    return app.test_client()


def auth(token: str = ADMIN_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin_headers() -> dict:
    return auth()


@pytest.fixture(scope="session")
def worker(settings, session_dir, live_api):
    """With the API up: a worker reaches its jobs' objects through the master, by their leases."""
    process = start_worker(settings, session_dir, name="session-worker")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def verifier(settings, session_dir):
    """The master's own worker (master credentials): it runs the jobs no node may record, a proof's verdict."""
    process = NexusProcess(settings, ["verifier"], session_dir, "verifier").start()
    process.wait_for_log("ready.")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api_process(settings, session_dir):
    """The real `nexus master` process behind live_api."""
    process, _url = start_api(settings, session_dir)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def live_api(settings, api_process):
    return settings.public_api_url, ADMIN_TOKEN


@pytest.fixture(scope="session")
def reconciler(settings, session_dir):
    process = NexusProcess(settings, ["reconciler"], session_dir, "reconciler").start()
    process.wait_for_log("reconciler running")
    yield process
    process.stop()
