"""Server commands find a running local cluster as clients do: the environment first, then cluster.json."""

from __future__ import annotations

import json
import os

import pytest

from nexus.config import load_server_settings

CLUSTER = {"api_url": "http://127.0.0.1:18000", "node_api_url": "http://127.0.0.1:18001",
           "database_url": "postgresql+psycopg2://postgres@127.0.0.1:15432/nexus", "redis_url": "redis://127.0.0.1:16379/0",
           "s3_endpoint": "127.0.0.1:19000", "s3_access_key": "nexus-abc", "s3_secret_key": "s" * 30,
           "admin_token": "nx_" + "a" * 40, "join_token": "nxj_" + "b" * 40, "flower_user": "admin",
           "flower_password": "p" * 24, "workers": 2}


@pytest.fixture
def cluster_file(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("NEXUS_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(CLUSTER))
    monkeypatch.setenv("NEXUS_CLUSTER_FILE", str(path))
    return path


def test_a_server_command_takes_the_running_clusters_servers_and_secrets(cluster_file):
    settings = load_server_settings()
    assert (settings.database_url, settings.redis_url, settings.s3_endpoint) == (
        CLUSTER["database_url"], CLUSTER["redis_url"], CLUSTER["s3_endpoint"])
    assert settings.join_token == CLUSTER["join_token"] and settings.s3_secret_key == CLUSTER["s3_secret_key"]
    assert settings.agent_api_url == CLUSTER["node_api_url"] and settings.public_api_url == CLUSTER["api_url"]


def test_the_environment_wins_and_is_never_mixed_with_the_file(cluster_file, monkeypatch):
    monkeypatch.setenv("NEXUS_REDIS_URL", "redis://10.0.0.5:6379/0")
    settings = load_server_settings()
    assert settings.redis_url == "redis://10.0.0.5:6379/0"
    assert settings.database_url != CLUSTER["database_url"]  # the environment names a server: the file is not read
    assert settings.join_token != CLUSTER["join_token"]


def test_flags_win_over_the_file_and_no_file_means_the_defaults(cluster_file):
    assert load_server_settings(join_token="nxj_" + "c" * 40).join_token == "nxj_" + "c" * 40
    cluster_file.unlink()
    assert load_server_settings().database_url == "postgresql+psycopg2://postgres@127.0.0.1:5432/nexus"
