"""The compose files, the env files and Settings agree (docs/ARCHITECTURE.md, "One settings object"), checked without Docker."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pytest
import yaml

from nexus.cli.config import is_secret
from nexus.config import Settings
from nexus.credentials import KNOWN_DEFAULT_SECRETS, is_weak
from tests.deploy_support import (ROOT, MissingVariable, environment_of, interpolate, load_compose, load_env,
                                  raw_text, referenced_variables, unbraced_references)

ROLES = ("master", "worker")
# Variables Compose itself reads from the env file rather than the compose file.
COMPOSE_OWN = {"COMPOSE_PROFILES"}


def settings_variables() -> set[str]:
    # Derived, not listed: other features add Settings fields, and this test follows them.
    return {f"NEXUS_{name.upper()}" for name in Settings.model_fields}


# --- the interpolation these tests rely on -----------------------------------------------
def test_interpolation_follows_compose_rules():
    env = {"A": "a", "EMPTY": ""}
    assert interpolate("x${A}y$${A}", env) == "xay${A}"
    assert interpolate("${EMPTY:-d} ${MISSING-d} ${EMPTY-d}", env) == "d d "
    assert interpolate("${A:+u=${A}} ${EMPTY:+no}", env) == "u=a "
    with pytest.raises(MissingVariable, match="run just config"):
        interpolate("${EMPTY:?run just config}", env)
    with pytest.raises(MissingVariable):
        interpolate("${MISSING}", env)


# --- variables ------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_every_variable_the_compose_file_uses_is_defined_in_its_env_file(role):
    defined = set(load_env(role))
    missing = referenced_variables(role) - defined
    assert not missing, f"{role}-compose.yml uses variables its env file lacks: {sorted(missing)}"
    assert not unbraced_references(role), "write ${VAR}, not $VAR (and $$ for a literal dollar)"
    load_compose(role)  # every ${VAR:?...} guard is satisfied by the committed file


@pytest.mark.parametrize("role", ROLES)
def test_every_env_file_variable_is_used(role):
    unused = set(load_env(role)) - referenced_variables(role) - COMPOSE_OWN
    assert not unused, f"{role} env file defines variables nothing reads: {sorted(unused)}"


@pytest.mark.parametrize("role", ROLES)
def test_every_nexus_variable_is_a_settings_field(role):
    known = settings_variables()
    in_env_file = {name for name in load_env(role) if name.startswith("NEXUS_")}
    in_containers = {name for service in load_compose(role)["services"].values()
                     for name in environment_of(service) if name.startswith("NEXUS_")}
    unknown = (in_env_file | in_containers) - known
    assert not unknown, f"NEXUS_* variables that Settings does not read: {sorted(unknown)}"
    assert in_containers, "the containers get their settings as NEXUS_* variables"


@pytest.mark.parametrize("role", ROLES)
def test_every_env_file_line_has_a_comment(role):
    lines = (ROOT / ("bento.env" if role == "master" else "worker.env")).read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            above = lines[index - 1] if index else ""
            assert above.startswith("#") or " # " in line, f"no comment says what {line.split('=')[0]} is"


# --- images ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_images_are_pinned_to_explicit_tags(role):
    for name, service in load_compose(role)["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no explicit tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"


# --- master ---------------------------------------------------------------------------------
def master_services() -> dict:
    return load_compose("master")["services"]


def published(service: dict) -> list[tuple[str, int, int]]:
    out = []
    for mapping in service.get("ports", []):
        host_ip, host_port, container_port = str(mapping).rsplit(":", 2) if str(mapping).count(":") == 2 \
            else ("", *str(mapping).split(":"))
        out.append((host_ip, int(host_port), int(container_port)))
    return out


def test_master_ports_are_those_of_seed_004_on_the_internal_address_only():
    services, master_ip = master_services(), load_env("master")["MASTER_HOST_IP"]
    expected = {"redis": [6379], "postgres": [5432], "minio": [9000, 9001], "api": [8000, 8001], "flower": [5555],
                "grafana": [3000], "prometheus": [9090]}
    for name, ports in expected.items():
        mappings = published(services[name])
        assert [p for _, p, _ in mappings] == ports, name
        for host_ip, host_port, container_port in mappings:
            assert host_port == container_port
            allowed = {"127.0.0.1"} if name == "prometheus" else {master_ip}
            assert host_ip in allowed, f"{name} publishes {host_port} on {host_ip or '0.0.0.0'}"
    unpublished = {"reconciler", "verifier", "minio-users"}
    assert set(services) - set(expected) == unpublished and not any(services[n].get("ports") for n in unpublished)


def test_master_services_reach_each_other_by_service_name():
    services = master_services()
    env = environment_of(services["api"])
    assert urlsplit(env["NEXUS_DATABASE_URL"]).hostname == "postgres"
    assert urlsplit(env["NEXUS_DATABASE_URL"]).port == published(services["postgres"])[0][2]
    assert urlsplit(env["NEXUS_REDIS_URL"]).hostname == "redis"
    assert env["NEXUS_S3_ENDPOINT"] == f"minio:{published(services['minio'])[0][2]}"
    assert int(env["NEXUS_API_PORT"]) == published(services["api"])[0][2]
    assert env["NEXUS_API_URL"] == f"http://{load_env('master')['MASTER_HOST_IP']}:8000"
    # Agents beat on the node API, a listener of its own that the api service runs and publishes.
    assert int(env["NEXUS_NODE_API_PORT"]) == published(services["api"])[1][2]
    agent = yaml.safe_load((ROOT / "worker-compose.yml").read_text())["x-agent"]["environment"]
    assert agent["NEXUS_NODE_API_URL"] == "http://${MASTER_HOST_IP}:" + env["NEXUS_NODE_API_PORT"]
    assert all(f":{port}/healthz" in " ".join(services["api"]["healthcheck"]["test"])
               for port in (env["NEXUS_API_PORT"], env["NEXUS_NODE_API_PORT"]))
    for name in ("api", "reconciler", "flower"):
        assert environment_of(services[name])["NEXUS_DATABASE_URL"] == env["NEXUS_DATABASE_URL"], name
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in prometheus["scrape_configs"]}
    assert targets["nexus-api"] == "api:8000" and targets["flower"] == "flower:5555"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_master_stores_are_configured_for_durability_and_replication():
    services = master_services()
    redis_args = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_args and "--appendonly yes" in redis_args
    assert "--requirepass" in redis_args
    postgres_args = " ".join(services["postgres"]["command"])
    assert "wal_level=replica" in postgres_args and "max_wal_senders" in postgres_args
    assert services["postgres"]["environment"]["REPLICATION_USER"]
    init = (ROOT / "deploy/postgres/init-replication.sh").read_text()
    assert "REPLICATION LOGIN" in init and "host replication" in init
    assert "--console-address" in services["minio"]["command"] and ":9001" in services["minio"]["command"]
    for name in ("redis", "postgres", "minio", "api", "flower"):
        assert services[name].get("healthcheck"), f"{name} has no health check"


def test_api_runs_migrations_under_a_production_wsgi_server():
    from nexus.cli.services import master_cmd

    command = master_services()["api"]["command"]
    assert command[:2] == ["nexus", "master"]
    assert "--workers" in command and {p.name for p in master_cmd.params} >= {"workers"}
    source = (ROOT / "nexus/master.py").read_text()
    assert "upgrade_head" in source and "gunicorn" in source
    # Streams and long-polls hold a greenlet each, not a thread: every start goes through `nexus master`.
    assert '"--worker-class", "gevent"' in source and "api_worker_connections" in source


def test_flower_has_basic_auth_and_binds_the_internal_address():
    from nexus.cli.services import flower_cmd

    flower = master_services()["flower"]
    assert flower["command"] == ["nexus", "flower"] and flower_cmd.name == "flower"
    env = environment_of(flower)
    assert env["NEXUS_FLOWER_USER"] and not is_weak(env["NEXUS_FLOWER_USER"] * 12)
    assert "${NEXUS_FLOWER_PASSWORD:?" in raw_text("master")  # no password, no Flower
    assert "FLOWER_BASIC_AUTH" in (ROOT / "nexus/queueing/monitor.py").read_text()
    [(host_ip, _, _)] = published(flower)
    assert host_ip == load_env("master")["MASTER_HOST_IP"]


def test_monitoring_profile_scrapes_metrics_with_a_token_and_provisions_the_dashboard():
    services = master_services()
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    api_job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "nexus-api")
    assert api_job["metrics_path"] == "/metrics"
    token_file = api_job["authorization"]["credentials_file"]
    assert any(c["target"] == token_file for c in services["prometheus"]["configs"])
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/nexus.json").read_text())
    queries = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []))
    for metric in ("nexus_jobs", "nexus_queue_depth", "nexus_nodes", "nexus_gpu_utilization_percent",
                   "nexus_gpu_memory_free_bytes", "nexus_job_duration_seconds_bucket"):
        assert metric in queries, f"the dashboard shows no {metric}"
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/nexus.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in mounted


def test_the_dashboard_queries_only_metrics_nexus_exports():
    # The metric families the code defines (GaugeMetricFamily("nexus_…"), HistogramMetricFamily(…), …).
    source = " ".join(path.read_text() for path in (ROOT / "nexus").rglob("*.py"))
    exported = set(re.findall(r'MetricFamily\(\s*"(nexus_[a-z_]+)"', source))
    assert {"nexus_jobs", "nexus_queue_depth"} <= exported
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/nexus.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for metric in re.findall(r"\bnexus_[a-z_]+", target["expr"]):
                family = re.sub(r"_(bucket|count|sum)$", "", metric)
                assert family in exported, f"panel {panel['title']!r} queries {metric}, which Nexus does not export"


# --- worker ---------------------------------------------------------------------------------
def worker_services() -> dict:
    return load_compose("worker")["services"]


def test_worker_reserves_gpus_and_keeps_its_data():
    services = worker_services()
    [device] = services["agent"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["agent"]["profiles"] == ["gpu"] and services["agent-cpu"]["profiles"] == ["cpu"]
    for name in ("agent", "agent-cpu"):
        assert services[name]["command"] == ["nexus", "agent"]
        assert any(v.endswith(":/data") for v in services[name]["volumes"])
        assert environment_of(services[name])["NEXUS_DATA_DIR"] == "/data"
    assert not any(service.get("ports") for service in services.values()), "a worker publishes no port"


def test_worker_replicas_follow_the_master():
    services, env = worker_services(), load_env("worker")
    for name in ("redis-replica", "postgres-standby", "minio-local", "minio-mirror"):
        assert services[name]["profiles"] == ["replicas"], name
    redis_args = services["redis-replica"]["command"]
    assert redis_args[redis_args.index("--replicaof") + 1] == env["MASTER_HOST_IP"]
    standby_script = (ROOT / "deploy/postgres/standby-entrypoint.sh").read_text()
    assert "pg_basebackup" in standby_script and " -R " in standby_script
    assert services["postgres-standby"]["image"] == master_services()["postgres"]["image"]  # same major version
    assert "mc mirror" in (ROOT / "deploy/minio/mirror.sh").read_text()


def test_the_agent_reads_from_local_replicas_only_when_they_run():
    with_replicas = {**load_env("worker"), "LOCAL_REPLICAS": "true"}
    agent = environment_of(load_compose("worker", with_replicas)["services"]["agent"])
    names = set(worker_services())
    assert urlsplit(agent["NEXUS_REPLICA_DATABASE_URL"]).hostname == "postgres-standby" in names
    assert urlsplit(agent["NEXUS_REPLICA_REDIS_URL"]).hostname == "redis-replica" in names
    assert agent["NEXUS_REPLICA_S3_ENDPOINT"].split(":")[0] == "minio-local"
    # Writes go to the master.
    assert urlsplit(agent["NEXUS_DATABASE_URL"]).hostname == with_replicas["MASTER_HOST_IP"]
    without = environment_of(load_compose("worker", {**load_env("worker"), "LOCAL_REPLICAS": ""})["services"]["agent"])
    assert without["NEXUS_REPLICA_DATABASE_URL"] == without["NEXUS_REPLICA_S3_ENDPOINT"] == ""


# --- secrets --------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_no_secret_has_a_known_default(role):
    text = raw_text(role)
    for name, value in load_env(role).items():
        if not is_secret(name):
            continue
        assert value.strip().lower() not in KNOWN_DEFAULT_SECRETS, f"{name} ships a service's default"
        # The committed values are placeholders that production refuses (`just config` replaces them).
        assert is_weak(value) and value.startswith("change-me"), f"{name} must be a placeholder in the template"
        assert not re.search(r"\$\{" + name + r":?-", text), f"{name} has a default in the compose file"


def _master_settings(env: dict[str, str]) -> Settings:
    api = environment_of(load_compose("master", env)["services"]["api"])
    return Settings(**{k[len("NEXUS_"):].lower(): v for k, v in api.items() if k.startswith("NEXUS_")})


def test_production_refuses_the_template_secrets_with_a_clear_message():
    with pytest.raises(ValueError, match="production mode refuses") as info:
        _master_settings(load_env("master"))
    assert re.search(r"NEXUS_[A-Z_]+", str(info.value)) and "just config" in str(info.value)
    # Passwords that reach Nexus inside URLs are refused too.
    strong = {name: "Str0ng" + "x" * 30 if is_secret(name) else v for name, v in load_env("master").items()}
    with pytest.raises(ValueError, match="NEXUS_DATABASE_URL"):
        _master_settings({**strong, "POSTGRES_PASSWORD": "postgres"})
    with pytest.raises(ValueError, match="NEXUS_S3_SECRET_KEY"):
        _master_settings({**strong, "NEXUS_S3_SECRET_KEY": "minioadmin"})
    assert _master_settings(strong).mode.value == "production"


def test_each_master_process_reaches_redis_as_the_user_settings_name():
    """The API and the reconciler log in as their own ACL users, with the rules nexus.credentials gives them (the
    ones `nexus dev` and the tests' Redis use), and neither holds the default user's password."""
    from nexus.credentials import (API_REDIS_USER, RECONCILER_REDIS_USER, SERVICE_REDIS_RULES, WORKER_REDIS_RULES,
                                   WORKER_REDIS_USER)

    services = master_services()
    env = load_env("master")
    args = services["redis"]["command"]
    users = {}
    for at in [i for i, arg in enumerate(args) if arg == "--user"]:
        end = next((i for i in range(at + 1, len(args)) if args[i].startswith("--")), len(args))
        users[args[at + 1]] = args[at + 2:end]
    for user, rules in ((WORKER_REDIS_USER, WORKER_REDIS_RULES), (API_REDIS_USER, SERVICE_REDIS_RULES),
                        (RECONCILER_REDIS_USER, SERVICE_REDIS_RULES)):
        on, password, *granted = users[user]
        assert on == "on" and password.startswith(">") and granted == rules.split()
    for service, user, secret in (("api", API_REDIS_USER, "NEXUS_API_REDIS_PASSWORD"),
                                  ("reconciler", RECONCILER_REDIS_USER, "NEXUS_RECONCILER_REDIS_PASSWORD")):
        url = urlsplit(services[service]["environment"]["NEXUS_REDIS_URL"])
        assert (url.username, url.password, url.hostname) == (user, env[secret], "redis")
        assert not any("redis://:" in str(v) for v in services[service]["environment"].values())  # no default login
        assert users[user][1] == ">" + env[secret]
