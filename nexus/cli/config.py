"""`nexus config` (`just config`): write bento.env and worker.env with strong secrets and a join token.

The committed env files are the templates: their comments stay, only values
change. Re-running keeps every secret that is already strong (a running
cluster keeps working) unless `--rotate` is given, and replaces placeholders.

    just config                                     # on the master: asks, writes both files
    just config -y --master-ip 10.0.0.5             # the same without questions
    just config --role worker -y --cpu --replicas   # on a worker, after copying worker.env there
    just config --check bento.env                   # exit 1 if a secret is a placeholder or default
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import socket
import string
from dataclasses import dataclass
from pathlib import Path

import click

from nexus.credentials import is_weak, worker_role_name

MASTER_ENV, WORKER_ENV = "bento.env", "worker.env"
_SECRET_NAME = re.compile(r"(PASSWORD|_TOKEN|SECRET_KEY)$")
_LINE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")
# What a worker needs from the master's settings (never the admin token, the Flower or Grafana password,
# nor the database owner's: workers get a role of their own, DEPLOYMENT.md "Credentials").
SHARED_WITH_WORKERS = ("MASTER_HOST_IP", "NEXUS_JOIN_TOKEN", "POSTGRES_DB", "WORKER_DATABASE_USER",
                       "WORKER_DATABASE_PASSWORD", "WORKER_REDIS_PASSWORD", "REDIS_REPLICATION_PASSWORD",
                       "NEXUS_S3_ACCESS_KEY", "NEXUS_S3_SECRET_KEY", "REPLICATION_USER", "REPLICATION_PASSWORD")
TOKEN_PREFIXES = {"NEXUS_ADMIN_TOKEN": "nx_", "NEXUS_JOIN_TOKEN": "nxj_"}


# --- env files: parse and rewrite, keeping comments ---------------------------------------
def is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as Compose reads them (comments and blank lines skipped, quotes removed)."""
    values = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            values[match["key"]] = _unquote(match["value"])
    return values


def _quote(value: str) -> str:
    return f'"{value}"' if re.search(r"\s", value) else value


def render_env(template: str, values: dict[str, str]) -> str:
    """The template with each KEY's value replaced; every key in `values` must be in the template."""
    missing = set(values) - set(parse_env(template))
    if missing:
        raise click.ClickException(f"the template has no {', '.join(sorted(missing))}: is it from this version?")
    lines = []
    for line in template.splitlines():
        match = _LINE.match(line.strip())
        if match and match["key"] in values:
            line = f"{match['key']}={_quote(values[match['key']])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def weak_secrets(values: dict[str, str]) -> list[str]:
    """Names of secrets that are empty, placeholders or well-known defaults (production refuses them)."""
    return [name for name, value in values.items() if is_secret(name) and is_weak(value)]


_ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 40  # ~238 bits


def generate_secret(name: str) -> str:
    """Letters and digits only: safe inside redis:// and postgresql:// URLs, in YAML, in command
    arguments (no leading '-') and in Compose files (no `$` to interpolate)."""
    return TOKEN_PREFIXES.get(name, "") + "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))


# --- what the wizard decides ------------------------------------------------------------
@dataclass
class Answers:
    master_ip: str
    subnet: str
    node_name: str
    gpu: bool
    replicas: bool
    monitoring: bool


def with_secrets(current: dict[str, str], rotate: bool) -> dict[str, str]:
    """Every secret in `current` kept if strong (and not rotating), else freshly generated."""
    return {name: generate_secret(name) if rotate or is_weak(value) else value
            for name, value in current.items() if is_secret(name)}


def master_values(template: dict[str, str], answers: Answers, rotate: bool) -> dict[str, str]:
    return {
        **with_secrets(template, rotate),
        "MASTER_HOST_IP": answers.master_ip,
        "CLUSTER_SUBNET": answers.subnet,
        "COMPOSE_PROFILES": "monitoring" if answers.monitoring else "",
        "NEXUS_MODE": "production",
    }


def worker_credentials(master: dict[str, str]) -> dict[str, str]:
    """The worker's database and broker logins, from bento.env (or an earlier worker.env)."""
    if "NEXUS_WORKER_DATABASE_PASSWORD" not in master:  # already a worker.env
        return {}
    return {"WORKER_DATABASE_USER": worker_role_name(master.get("POSTGRES_DB", "nexus")),
            "WORKER_DATABASE_PASSWORD": master["NEXUS_WORKER_DATABASE_PASSWORD"],
            "WORKER_REDIS_PASSWORD": master["NEXUS_WORKER_REDIS_PASSWORD"],
            # The workers' own object-store key, under the names a worker's Settings read.
            "NEXUS_S3_ACCESS_KEY": master["NEXUS_WORKER_S3_ACCESS_KEY"],
            "NEXUS_S3_SECRET_KEY": master["NEXUS_WORKER_S3_SECRET_KEY"]}


def worker_values(master: dict[str, str], answers: Answers) -> dict[str, str]:
    extras = "gpu" if answers.gpu else "cpu"
    version = master.get("MASTER_IMAGE", "nexus:0.1.0").rpartition(":")[2] or "0.1.0"
    master = {**master, **worker_credentials(master)}
    return {
        **{name: master[name] for name in SHARED_WITH_WORKERS if name in master},
        "MASTER_HOST_IP": answers.master_ip,
        "NEXUS_NODE_NAME": answers.node_name,
        "COMPOSE_PROFILES": extras + (",replicas" if answers.replicas else ""),
        "LOCAL_REPLICAS": "true" if answers.replicas else "",
        "WORKER_EXTRAS": extras,
        "WORKER_IMAGE": f"nexus-worker:{version}-{extras}",
        "NEXUS_MODE": "production",
    }


# --- guesses for the questions' defaults -----------------------------------------------------
def lan_address() -> str:
    """The address this host uses towards the LAN (no packet is sent: UDP connect only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def subnet_of(address: str, prefix: int = 24) -> str:
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


# --- files ---------------------------------------------------------------------------------------
def read_template(folder: Path, name: str) -> str:
    path = folder / name
    if not path.is_file():
        raise click.ClickException(f"{path} not found: run this from the Nexus checkout (it holds the templates)")
    return path.read_text()


def write_private(path: Path, text: str) -> None:
    """Written 0600 from the start: the file holds the cluster's secrets."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def check_file(path: Path) -> list[str]:
    """Problems that must stop `master-up` / `worker-up`."""
    values = parse_env(path.read_text())
    weak = weak_secrets(values)
    problems = [f"weak secrets {', '.join(weak)} (empty, placeholders or well-known defaults)"] if weak else []
    if not values.get("MASTER_HOST_IP"):
        problems.append("MASTER_HOST_IP is not set")
    return problems


def _ask(answers: Answers, role: str, subnet_given: bool) -> Answers:
    ip = click.prompt("Master's internal (LAN) address", default=answers.master_ip)
    subnet = answers.subnet if role == "worker" else click.prompt(
        "Subnet the workers live in (PostgreSQL accepts replication from it only)",
        default=answers.subnet if subnet_given else subnet_of(ip))
    node = answers.node_name if role == "master" else click.prompt("This worker's node name", default=answers.node_name)
    gpu = answers.gpu if role == "master" else click.confirm("Does this worker have NVIDIA GPUs?", default=answers.gpu)
    replicas = answers.replicas if role == "master" else click.confirm(
        "Run local replicas (Redis, PostgreSQL standby, MinIO mirror) on this worker?", default=answers.replicas)
    monitoring = answers.monitoring if role == "worker" else click.confirm(
        "Start Prometheus and Grafana on the master?", default=answers.monitoring)
    return Answers(ip, subnet, node, gpu, replicas, monitoring)


def _defaults(existing: dict[str, str], master_ip: str | None, subnet: str | None, node_name: str | None,
              gpu: bool | None, replicas: bool | None, monitoring: bool | None) -> Answers:
    ip = master_ip or lan_address()
    return Answers(
        master_ip=ip,
        subnet=subnet or subnet_of(ip),
        node_name=node_name or socket.gethostname(),
        gpu=has_nvidia_gpu() if gpu is None else gpu,
        replicas=bool(existing.get("LOCAL_REPLICAS")) if replicas is None else replicas,
        monitoring="monitoring" in existing.get("COMPOSE_PROFILES", "") if monitoring is None else monitoring,
    )


@click.command("config")
@click.option("--role", type=click.Choice(["master", "worker"]), default="master", show_default=True,
              help="master: write bento.env and worker.env; worker: rewrite this host's worker.env.")
@click.option("-y", "--yes", "non_interactive", is_flag=True, help="Ask nothing; take flags and defaults.")
@click.option("--master-ip", help="The master's internal address (default: this host's LAN address).")
@click.option("--subnet", help="CIDR of the worker network (default: the master's /24).")
@click.option("--node-name", help="Worker node name (default: the host name).")
@click.option("--gpu/--cpu", default=None, help="Worker with NVIDIA GPUs or CPU only (default: detected).")
@click.option("--replicas/--no-replicas", default=None, help="Local read replicas on the worker.")
@click.option("--monitoring/--no-monitoring", default=None, help="Prometheus + Grafana on the master.")
@click.option("--from-master", "from_master", type=click.Path(dir_okay=False, path_type=Path),
              help="Worker role: take the shared secrets from this bento.env or worker.env (default: ./worker.env).")
@click.option("--rotate", is_flag=True, help="Replace every secret, strong or not (restart the whole cluster after).")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where the env files are read and written.")
@click.option("--check", "check", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Only check this env file for placeholder or default secrets; exit 1 on any.")
def config_cmd(role, non_interactive, master_ip, subnet, node_name, gpu, replicas, monitoring, from_master, rotate,
               folder, check):
    """Write bento.env / worker.env with strong generated secrets and a join token."""
    if check is not None:
        _run_check(check)
        return
    if role == "master":
        _configure_master(folder, non_interactive, rotate, master_ip, subnet, node_name, gpu, replicas, monitoring)
    else:
        _configure_worker(folder, from_master, non_interactive, master_ip, node_name, gpu, replicas)


def _run_check(path: Path) -> None:
    problems = check_file(path)
    if problems:
        raise click.ClickException(f"{path}: " + "; ".join(problems) + ". Run `just config` to generate secrets.")
    click.echo(f"{path}: every secret is set and strong")


def _configure_master(folder, non_interactive, rotate, master_ip, subnet, node_name, gpu, replicas, monitoring):
    master_template, worker_template = read_template(folder, MASTER_ENV), read_template(folder, WORKER_ENV)
    existing = {**parse_env(worker_template), **parse_env(master_template)}
    answers = _defaults(existing, master_ip or _real_ip(existing), subnet, node_name, gpu, replicas, monitoring)
    if not non_interactive:
        answers = _ask(answers, "master", subnet_given=subnet is not None)
    master = master_values(parse_env(master_template), answers, rotate)
    # The worker file is a starting point for every worker; `--role worker` on each host names the node
    # (left empty here, so `worker-up` refuses to start a node that was never named).
    worker = {**worker_values({**parse_env(master_template), **master}, answers), "NEXUS_NODE_NAME": ""}
    write_private(folder / MASTER_ENV, render_env(master_template, master))
    write_private(folder / WORKER_ENV, render_env(worker_template, worker))
    click.echo(f"wrote {folder / MASTER_ENV} and {folder / WORKER_ENV} (mode 600; never commit them)")
    click.echo(f"  master {answers.master_ip}, workers from {answers.subnet}, "
               f"monitoring {'on' if answers.monitoring else 'off'}")
    click.echo(f"  next: `just master-up` here; copy {WORKER_ENV} to each worker host and run "
               "`just config --role worker` then `just worker-up` there")


def _configure_worker(folder, from_master, non_interactive, master_ip, node_name, gpu, replicas):
    worker_template = read_template(folder, WORKER_ENV)
    source = parse_env((from_master or folder / WORKER_ENV).read_text())
    weak = [name for name in SHARED_WITH_WORKERS if is_secret(name) and is_weak(source.get(name, ""))]
    if weak:
        raise click.ClickException(
            f"{from_master or folder / WORKER_ENV} lacks the master's secrets ({', '.join(weak)}): run "
            f"`just config` on the master and copy its {WORKER_ENV} here (or pass --from-master)")
    answers = _defaults(source, master_ip or source.get("MASTER_HOST_IP"), None, node_name, gpu, replicas, False)
    if not non_interactive:
        answers = _ask(answers, "worker", subnet_given=True)
    write_private(folder / WORKER_ENV, render_env(worker_template, worker_values(source, answers)))
    click.echo(f"wrote {folder / WORKER_ENV}: node {answers.node_name}, "
               f"{'GPU' if answers.gpu else 'CPU'}, replicas {'on' if answers.replicas else 'off'}, "
               f"master {answers.master_ip}")
    click.echo("  next: `just worker-up`")


def _real_ip(existing: dict[str, str]) -> str | None:
    """The address from an earlier run, but not the template's example."""
    ip = existing.get("MASTER_HOST_IP")
    return ip if ip and ip != "192.168.1.100" else None
