"""The Docker-free local cluster: `nexus dev -n 3`.

Starts real servers installed from the package registries (Redis, PostgreSQL,
an S3 server) unless NEXUS_* URLs point at running ones, then the master (the API,
with the reconciler and Flower inside its watching process), the verifier and N
workers as supervised child processes (restarted when they crash). Unless told
otherwise it serves a model: the tiny one, made on first start under DIR/models,
declared and deployed on the first worker. Writes DIR/cluster.json, prints the URLs and the admin token, and stops everything in
order on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from nexus.client import NexusClient, NexusError
from nexus.supervisor import ChildSpec, RestartPolicy, Supervisor
from nexus.config import Settings
from nexus.credentials import API_REDIS_USER, RECONCILER_REDIS_USER, WORKER_REDIS_USER, service_redis_acl, worker_redis_acl
from nexus.queueing.health import StuckWorkers
from nexus.localservers import LocalServer, PostgresServer, RedisServer, S3Server, free_port
from nexus.localservers.s3 import ScopedKey

log = logging.getLogger(__name__)

NEXUS = (sys.executable, "-m", "nexus")
TINY_MODEL = "tiny"  # what `nexus dev` serves unless --model names another or --no-model


def local_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets generated on first start and reused after, so restarts keep tokens and data valid."""
    path = data_dir / "secrets.json"
    if path.exists():
        values = json.loads(path.read_text())
        added = {"worker_database_password": secrets.token_urlsafe(24), "worker_redis_password": secrets.token_hex(20),
                 "worker_s3_access_key": "nexus-worker-" + secrets.token_hex(4),
                 "worker_s3_secret_key": secrets.token_urlsafe(30), "api_redis_password": secrets.token_hex(20),
                 "reconciler_redis_password": secrets.token_hex(20)}
        if set(added) - set(values):  # written before workers (or the API, the reconciler) had credentials of their own
            values = {**added, **values}
            path.write_text(json.dumps(values, indent=2))
        return values
    values = {"admin_token": "nx_" + secrets.token_urlsafe(32), "join_token": "nxj_" + secrets.token_urlsafe(32),
              "flower_password": secrets.token_urlsafe(18), "s3_access_key": "nexus-" + secrets.token_hex(6),
              "s3_secret_key": secrets.token_urlsafe(30), "worker_database_password": secrets.token_urlsafe(24),
              "worker_redis_password": secrets.token_hex(20), "worker_s3_access_key": "nexus-worker-" + secrets.token_hex(4),
              "worker_s3_secret_key": secrets.token_urlsafe(30), "api_redis_password": secrets.token_hex(20),
              "reconciler_redis_password": secrets.token_hex(20)}
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    path.chmod(0o600)
    return values


def settings_env(settings: Settings, names: set[str]) -> dict[str, str]:
    """NEXUS_* variables that hand these settings to child processes."""
    return {f"NEXUS_{name.upper()}": str(getattr(settings, name)) for name in sorted(names)}


class LocalCluster:
    def __init__(self, settings: Settings, data_dir: Path, workers: int, model: str | None = TINY_MODEL):
        self.data_dir = data_dir.absolute()
        self.workers = workers
        self.model = model  # a catalog name or a model folder to serve; None: serve none
        self.base = settings
        self.servers: list[LocalServer] = []
        self.stop_requested = threading.Event()

    # --- servers ---------------------------------------------------------------------------
    def start_servers(self) -> Settings:
        given = self.base.model_fields_set
        overrides: dict = {**local_secrets(self.data_dir)} if not {"admin_token"} & given else {}
        overrides = {k: v for k, v in overrides.items() if k not in given}
        if "database_url" not in given:
            pg = self._start(PostgresServer(self.data_dir / "postgres", self._port("postgres")))
            overrides["database_url"] = pg.url_for("nexus")
        if "redis_url" not in given:
            overrides["redis_url"] = self._start(RedisServer(self.data_dir / "redis", self._port("redis"),
                                                             users=self._redis_users(overrides))).url
        else:  # a Redis of the user's own has none of our users, unless it says so
            for name in ("worker_redis_password", "api_redis_password", "reconciler_redis_password"):
                if name not in given:
                    overrides.pop(name, None)
        if "s3_endpoint" not in given:
            keys = {k: overrides.get(k) or getattr(self.base, k) for k in ("s3_access_key", "s3_secret_key")}
            worker_key = [ScopedKey("nexus-worker", overrides["worker_s3_access_key"], overrides["worker_s3_secret_key"],
                                    self.base.worker_bucket_actions())] if overrides.get("worker_s3_access_key") else []
            s3 = self._start(S3Server(self.data_dir / "s3", self._port("s3"), access_key=keys["s3_access_key"],
                                      secret_key=keys["s3_secret_key"], scoped_keys=worker_key))
            overrides["s3_endpoint"] = s3.endpoint
        elif "worker_s3_access_key" not in given:  # a store of the user's own has no such key
            overrides.pop("worker_s3_access_key", None)
            overrides.pop("worker_s3_secret_key", None)
        if "node_api_port" not in given:  # agents beat there (Settings.agent_api_url); a port kept across restarts
            overrides["node_api_port"] = self._port("node_api")
        overrides["data_dir"] = self.data_dir
        return self.base.model_copy(update=overrides)

    def _redis_users(self, overrides: dict) -> dict[str, str]:
        """The ACL users of our Redis: agents and workers, the API and the reconciler each use their own."""
        def password(name: str) -> str:
            return overrides.get(name) or getattr(self.base, name)

        users = {WORKER_REDIS_USER: (worker_redis_acl, password("worker_redis_password")),
                 API_REDIS_USER: (service_redis_acl, password("api_redis_password")),
                 RECONCILER_REDIS_USER: (service_redis_acl, password("reconciler_redis_password"))}
        return {user: acl(secret) for user, (acl, secret) in users.items() if secret}

    def _start(self, server: LocalServer) -> LocalServer:
        log.info("starting %s", server.name)
        server.start()
        self.servers.append(server)
        return server

    def _port(self, name: str) -> int:
        """Keep each server's port across restarts (URLs in cluster.json stay valid)."""
        path = self.data_dir / "ports.json"
        ports = json.loads(path.read_text()) if path.exists() else {}
        if name not in ports:
            ports[name] = free_port()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ports))
        return ports[name]

    # --- nexus processes ---------------------------------------------------------------------
    def child_specs(self, settings: Settings) -> list[ChildSpec]:
        names = {"database_url", "redis_url", "s3_endpoint", "s3_access_key", "s3_secret_key", "admin_token",
                 "join_token", "flower_password", "api_port", "api_host", "node_api_port", "data_dir",
                 "worker_database_password", "worker_redis_password", "worker_s3_access_key", "worker_s3_secret_key"}
        env = {**_inherited_env(), **settings_env(settings, names), "NEXUS_URL": settings.public_api_url}
        # The reconciler, Flower and the node API are threads of the master's watching process
        # (docs/ARCHITECTURE.md, "The master at rest"); their log is logs/api.log. The master reaches
        # Redis as the API's own ACL user, and its reconciler thread as the reconciler's
        # (DEPLOYMENT.md, "Credentials").
        master_env = {**env, "NEXUS_REDIS_URL": settings.api_redis_url,
                      **settings_env(settings, {"reconciler_redis_password"})}
        specs = [ChildSpec("api", (*NEXUS, "master", "--workers", "1", "--reconciler", "--flower",
                                   "--node-api-in-process"), master_env),
                 ChildSpec("verifier", (*NEXUS, "verifier"), env)]  # proofs' verdicts: the master's
        # Agents and their workers hold a worker's credentials only: the worker database role, no admin
        # token, no Flower password (docs/ARCHITECTURE.md, "Roles hold only what they need").
        node_env = {**_inherited_env(for_node=True), **settings.worker_environment(),
                    "NEXUS_URL": settings.public_api_url}
        specs += [self._agent_spec(i, node_env) for i in range(1, self.workers + 1)]
        return specs

    def _agent_spec(self, index: int, env: dict) -> ChildSpec:
        """Each dev worker is a node agent (registers with the join token, supervises its own Celery
        worker) with a data directory of its own; its drain grace fits inside the launcher's stop grace."""
        name = f"dev-worker-{index}"
        return ChildSpec(f"worker-{index}", (*NEXUS, "agent", "--name", name),
                         {**env, "NEXUS_NODE_NAME": name, "NEXUS_DATA_DIR": str(self.data_dir / "nodes" / name),
                          "NEXUS_AGENT_DRAIN_GRACE_SECONDS": "10"})

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{spec.name}.log", "ab") as out:
            return subprocess.Popen(list(spec.argv), env=dict(spec.env), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_requested.set())
        supervisor = None
        try:
            settings = self.start_servers()
            supervisor = Supervisor(self.child_specs(settings), RestartPolicy(0.5, 10, 30), spawn=self._spawn,
                                    unhealthy=StuckWorkers.for_settings(settings))  # alive, not consuming
            supervisor.start()
            self._wait_for_api(settings, supervisor)
            served = self._serve_model(settings, supervisor) if self.model and self.workers else None
            self._announce(settings, served)
            while not self.stop_requested.wait(0.5):
                supervisor.poll()
        finally:
            print("\nstopping the local cluster ...", flush=True)
            if supervisor is not None:
                supervisor.stop(grace_seconds=15)
            for server in reversed(self.servers):
                server.stop()
            print("stopped.", flush=True)

    def _wait_for_api(self, settings: Settings, supervisor: Supervisor, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            supervisor.poll()
            try:
                if requests.get(settings.public_api_url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        if not self.stop_requested.is_set():
            raise RuntimeError(f"the API did not become healthy in {timeout:.0f} s; see {self.data_dir}/logs/api.log")

    # --- the model it serves ------------------------------------------------------------------
    def _serve_model(self, settings: Settings, supervisor: Supervisor) -> str | None:
        """Declare the model and deploy it on the first worker, then wait until it answers; the
        model's name, or None (with the reason logged) when it cannot be served."""
        assert self.model is not None
        nexus = NexusClient(settings.public_api_url, settings.admin_token)
        try:
            name = self._declare(nexus, self.model)
            node = self._wait(supervisor, lambda: _ready_node(nexus, "dev-worker-1"), 90, "the first worker to register")
            instances = nexus.request("GET", f"/api/v1/models/{name}")["instances"]
            if not any(i["state"] not in ("stopped", "error") for i in instances):  # else an earlier start's serves
                nexus.request("POST", f"/api/v1/models/{name}/instances", json={"nodes": [node]})
            self._wait(supervisor, lambda: nexus.request("GET", f"/api/v1/models/{name}")["live_instances"] > 0,
                       180, f"model {name} to serve")
            return name
        except (NexusError, ModelUnavailable, TimeoutError) as exc:
            log.warning("serving no model: %s (see %s/logs/)", exc, self.data_dir)
            return None

    def _declare(self, nexus: NexusClient, model: str) -> str:
        """The catalog name to serve: the tiny model (made here on first start), a model folder
        (declared under its folder's name), or a model the catalog already holds."""
        if model == TINY_MODEL:
            folder, name = self._tiny_model(), TINY_MODEL
        elif Path(model).is_dir():
            folder, name = Path(model).absolute(), Path(model).absolute().name
        else:
            try:
                return nexus.request("GET", f"/api/v1/models/{model}")["name"]
            except NexusError as exc:
                raise ModelUnavailable(f"{model!r} is neither a model folder nor in the catalog ({exc.message})") from None
        try:
            nexus.request("POST", "/api/v1/models", json={"name": name, "source": str(folder), "max_model_len": 512})
        except NexusError as exc:
            if exc.status != 409:  # 409: declared by an earlier start
                raise
        return name

    def _tiny_model(self) -> Path:
        """Made once (a few seconds, no download) and cached under the data directory."""
        folder = self.data_dir / "models" / TINY_MODEL
        if not (folder / "config.json").exists():
            log.info("making the tiny model in %s", folder)
            made = subprocess.run([*NEXUS, "models", "make-tiny", str(folder)], capture_output=True, text=True)
            if made.returncode != 0:
                last_line = (made.stderr.strip().splitlines() or ["no output"])[-1]
                raise ModelUnavailable(f"making the tiny model failed ({last_line}); it needs the CPU extra "
                                       f"(scripts/install.sh installs it)")
        return folder

    def _wait(self, supervisor: Supervisor, done, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not self.stop_requested.is_set():
            supervisor.poll()
            try:
                result = done()
            except NexusError:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.5)
        raise TimeoutError("stopping")

    def _announce(self, settings: Settings, model: str | None = None) -> None:
        cluster = {
            "api_url": settings.public_api_url,
            "admin_token": settings.admin_token,
            "join_token": settings.join_token,
            "database_url": settings.database_url,
            "redis_url": settings.redis_url,
            "s3_endpoint": settings.s3_endpoint,
            "s3_access_key": settings.s3_access_key,
            "s3_secret_key": settings.s3_secret_key,
            "node_api_url": settings.agent_api_url,
            "flower_url": f"http://{settings.flower_host}:{settings.flower_port}",
            "flower_user": settings.flower_user,
            "flower_password": settings.flower_password,
            "workers": self.workers,
        }
        path = self.data_dir / "cluster.json"
        path.write_text(json.dumps(cluster, indent=2))
        path.chmod(0o600)
        token_command = f"$(python -c \"import json;print(json.load(open('{path}'))['admin_token'])\")"
        print(f"""
Nexus local cluster is up ({self.workers} workers). Ctrl-C stops it.
  API          {cluster['api_url']}   (docs: {cluster['api_url']}/docs)
  admin token  {cluster['admin_token']}
  console      {cluster['api_url']}/ui/?token={cluster['admin_token']}
  Flower       {cluster['flower_url']}   (user {settings.flower_user}, password in {path})
  logs         {self.data_dir}/logs/
  cluster.json {path}

Try:  curl -s -X POST {cluster['api_url']}/api/v1/jobs -H "Authorization: Bearer {token_command}" \\
           -H 'Content-Type: application/json' -d '{{"type": "noop", "payload": {{"echo": "hello"}}}}'
""", flush=True)
        if model:
            print(f"""Model {model} is serving:  nexus chat   or any OpenAI client with base_url {cluster['api_url']}/v1
""", flush=True)


class ModelUnavailable(Exception):
    """The model asked for cannot be served (no CPU extra, an unknown name)."""


def _ready_node(nexus: NexusClient, name: str) -> str | None:
    nodes = nexus.request("GET", "/api/v1/nodes")["nodes"]
    return next((n["id"] for n in nodes if n["name"] == name and n["state"] == "ready"), None)


def _inherited_env(for_node: bool = False) -> dict[str, str]:
    """Children inherit the launcher's environment (any NEXUS_* the user set), ours on top;
    `for_node` leaves out the master's secrets (and its database URL) for a worker node."""
    import os

    from nexus.credentials import MASTER_ONLY_SECRETS

    if not for_node:
        return dict(os.environ)
    withheld = {f"NEXUS_{name.upper()}" for name in (*MASTER_ONLY_SECRETS, "database_url")}
    return {k: v for k, v in os.environ.items() if k not in withheld}
