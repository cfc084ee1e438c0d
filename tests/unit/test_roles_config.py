"""Production mode keeps the master's and the workers' credentials apart (DEPLOYMENT.md, "Credentials")."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nexus.config import Role, Settings
from nexus.credentials import MASTER_ONLY_SECRETS, worker_role_name

STRONG = "Str0ng" + "x" * 30
MASTER = {"mode": "production", "s3_secret_key": STRONG + "s", "admin_token": STRONG + "a", "join_token": STRONG + "j",
          "flower_password": STRONG + "f", "worker_database_password": STRONG + "w",
          "worker_redis_password": STRONG + "v",
          "database_url": f"postgresql+psycopg2://nexus:{STRONG}p@db:5432/nexus",
          "redis_url": f"redis://:{STRONG}r@redis:6379/0"}


def test_a_masters_worker_settings_hold_only_the_workers_credentials():
    master = Settings(**MASTER)
    worker_env = master.worker_environment()
    assert not {f"NEXUS_{name.upper()}" for name in MASTER_ONLY_SECRETS} & set(worker_env)
    assert worker_env["NEXUS_ROLE"] == "worker"
    assert worker_env["NEXUS_DATABASE_URL"] == f"postgresql+psycopg2://nexus_worker_nexus:{STRONG}w@db:5432/nexus"
    assert worker_env["NEXUS_REDIS_URL"] == f"redis://nexus-worker:{STRONG}v@redis:6379/0"
    worker = Settings(**{k[len("NEXUS_"):].lower(): v for k, v in worker_env.items()})  # production accepts it
    assert worker.role is Role.WORKER and worker.mode.value == "production"


def worker_settings(**changes) -> dict:
    settings = {**{k: v for k, v in MASTER.items() if k not in MASTER_ONLY_SECRETS}, "role": "worker",
                "database_url": f"postgresql+psycopg2://nexus_worker_nexus:{STRONG}w@db:5432/nexus"}
    return {**settings, **changes}


@pytest.mark.parametrize("name", MASTER_ONLY_SECRETS)
def test_production_refuses_a_worker_holding_a_master_secret(name):
    Settings(**worker_settings())
    with pytest.raises(ValidationError, match=f"master-only secrets.*NEXUS_{name.upper()}"):
        Settings(**worker_settings(**{name: STRONG + "m"}))


def test_production_refuses_a_worker_logging_in_as_the_database_owner():
    with pytest.raises(ValidationError, match="must log in as the worker role 'nexus_worker_nexus'"):
        Settings(**worker_settings(database_url=f"postgresql+psycopg2://nexus:{STRONG}@db:5432/nexus"))


@pytest.mark.parametrize("settings", [MASTER, worker_settings()], ids=["master", "worker"])
@pytest.mark.parametrize("name, url", [
    ("database_url", "postgresql+psycopg2://nexus_worker_nexus@db:5432/nexus"),
    ("redis_url", "redis://redis:6379/0"),
    ("replica_redis_url", "redis://redis-replica:6379/0"),
])
def test_production_refuses_passwordless_store_urls(settings, name, url):
    with pytest.raises(ValidationError, match=f"passwordless connection URLs: NEXUS_{name.upper()}"):
        Settings(**{**settings, name: url})


def test_role_names_are_per_database_and_valid_identifiers():
    assert worker_role_name("nexus") == "nexus_worker_nexus"
    assert worker_role_name("nexus_test_0a1b2c") != worker_role_name("nexus_test_3d4e5f")
    assert worker_role_name("My-DB") == "nexus_worker_my_db"
    assert len(worker_role_name("x" * 100)) == 63
