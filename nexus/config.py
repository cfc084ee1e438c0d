"""Settings: the only reader of NEXUS_* environment variables.

Every knob of the master, the workers, the agent and the local cluster lives
here, with the same names `bento.env` and `worker.env` set (a test proves they
agree). Code receives a `Settings` instance; nothing else reads os.environ.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nexus.credentials import (API_REDIS_USER, MASTER_ONLY_SECRETS, RECONCILER_REDIS_USER, WORKER_REDIS_USER, is_weak,
                               worker_role_name)

class Mode(str, Enum):
    DEV = "dev"
    PRODUCTION = "production"


class Role(str, Enum):
    """Which credentials a process may hold (DEPLOYMENT.md, "Credentials"): the master's processes hold
    the schema owner and the root keys; a worker node (agent, workers, model servers) only its own."""

    MASTER = "master"
    WORKER = "worker"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEXUS_", extra="ignore", frozen=True)

    mode: Mode = Mode.DEV
    role: Role = Role.MASTER  # NEXUS_ROLE: worker.env says worker (see Role)

    # --- master services -------------------------------------------------
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/nexus"  # a worker's: its own role
    # The master sets this password on the worker role (nexus.jobs.worker_role); workers carry it in
    # their NEXUS_DATABASE_URL. Empty: no password (trust authentication, dev and tests only).
    worker_database_password: str = ""
    # The workers' Redis ACL user's password (WORKER_REDIS_USER): workers carry it in their NEXUS_REDIS_URL.
    # Empty: workers share the master's Redis login (dev without ACL users).
    worker_redis_password: str = ""
    # The API's and the reconciler's Redis ACL users' passwords (API_REDIS_USER, RECONCILER_REDIS_USER): each
    # process gets its own NEXUS_REDIS_URL (`api_redis_url`, `reconciler_redis_url`), never the default
    # user's. Empty: that process uses NEXUS_REDIS_URL as it is (dev without ACL users).
    api_redis_password: str = ""
    reconciler_redis_password: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "nexus-dev-access"
    s3_secret_key: str = "nexus-dev-secret-key"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    bucket_inputs: str = "nexus-inputs"
    bucket_outputs: str = "nexus-outputs"
    bucket_receipts: str = "nexus-receipts"
    bucket_models: str = "nexus-models"
    # The workers' object-store key pair (a SeaweedFS identity or MinIO user whose policy is
    # `worker_bucket_actions`: model files only): workers carry it as their NEXUS_S3_ACCESS_KEY /
    # NEXUS_S3_SECRET_KEY, never the root keys above. Empty: workers hold the root keys (dev with a store of
    # the user's own); their jobs still reach tenant objects only through the master, by their leases.
    worker_s3_access_key: str = ""
    worker_s3_secret_key: str = ""
    presign_expiry_seconds: int = Field(900, ge=1, le=7 * 24 * 3600)

    # --- API ----------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_url: str = ""  # how workers and clients reach the API; derived when empty
    # The node API: register and heartbeat on a listener of their own (nexus.master), so user
    # traffic cannot starve them. 0: no separate listener (agents share the user API).
    node_api_port: int = Field(8001, ge=0, le=65535)
    node_api_url: str = ""  # how agents reach the node API; empty: derived as public_api_url is, else api_url
    # The user API's nice value: when the master's CPUs are saturated (a tenant's burst of requests), the
    # node API's heartbeats and the reconciler, at nice 0, get about three times its share (nexus.master).
    api_nice: int = Field(5, ge=0, le=19)
    admin_token: str = "nexus-dev-admin-token"  # bootstrap admin, created at master start
    join_token: str = "nexus-dev-join-token"  # workers present it to register
    # Limits (README "Limits"): what one request, one job and one token may ask of the master.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # a JSON request body (413 above)
    max_input_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # one upload to POST /api/v1/inputs
    max_output_bytes: int = Field(1024 * 1024 * 1024, ge=1024)  # one object a worker writes through its lease
    max_bulk_jobs: int = Field(10_000, ge=1)
    max_payload_bytes: int = Field(256 * 1024, ge=64)  # one job's payload as compact JSON
    max_children_per_job: int = Field(10_000, ge=1)  # child jobs one parent may create (batch chunks, segments)
    submitter_max_priority: int = Field(7, ge=0, le=9)  # admins may use up to 9
    # Per token, answered 429 with Retry-After; never applied to /healthz, node routes or worker tokens.
    rate_limit: str = "6000/minute"  # Flask-Limiter syntax ("100/second;6000/minute"); empty: no rate limit
    max_long_polls_per_token: int = Field(8, ge=1)  # concurrent ?wait= requests
    max_streams_per_token: int = Field(128, ge=1)  # concurrent /v1 completions (streamed or not)
    # Fair shares (nexus/jobs/fairshare.py): messages one tenant may have waiting in the broker per
    # queue; its other queued jobs wait as rows, published as its earlier messages are claimed.
    # Another tenant's job then waits behind at most this many of its messages. 0: no share (FIFO).
    max_broker_messages_per_tenant: int = Field(4, ge=0)
    # Open connections one API process holds (gevent greenlets: streams, long-polls, plain requests).
    api_worker_connections: int = Field(4096, ge=16, le=100_000)
    # /v1 requests one API process takes in at once, up to their job's publish (nexus/api/intake.py);
    # the others wait their turn. Enough to keep a core busy while some wait on Redis or PostgreSQL.
    api_intake_turns: int = Field(16, ge=1, le=10_000)
    # An API process remembers a token it resolved this long (by its hash), so thousands of requests
    # opened at once do not each queue for a database connection to look it up. A revocation through
    # this process takes effect at once; through another, within this TTL. 0: look up every request.
    auth_cache_seconds: float = Field(5.0, ge=0, le=300)

    # --- clients (CLI, NexusClient): where the API is and which token to use ---
    url: str = ""  # NEXUS_URL; else the local cluster's cluster.json, else public_api_url
    token: str = ""  # NEXUS_TOKEN; else the local cluster's admin token
    cluster_file: Path = Path(".nexus") / "cluster.json"  # written by `nexus dev`

    # --- Flower ---------------------------------------------------------------
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_user: str = "admin"
    flower_password: str = "nexus-dev-flower"

    # --- job lifecycle ----------------------------------------------------------
    default_max_attempts: int = Field(3, ge=1, le=100)
    retry_backoff_base_seconds: float = Field(1.0, ge=0)
    retry_backoff_max_seconds: float = Field(300.0, ge=0)
    job_lease_seconds: float = Field(30.0, gt=0)
    job_heartbeat_seconds: float = Field(5.0, gt=0)
    reconcile_interval_seconds: float = Field(2.0, gt=0)
    # Redis re-delivers an unacknowledged message after this; it must outlast the longest job.
    visibility_timeout_seconds: int = Field(6 * 3600, ge=60)

    # --- retention: the reconciler deletes finished work this long after it finished (0 keeps it) ---
    # /v1 requests each leave a `completion` job: they go far sooner than jobs someone asked for.
    retention_completion_seconds: float = Field(24 * 3600.0, ge=0)
    # Every other finished job (with its children, events and objects), removed nodes, stopped instances.
    retention_seconds: float = Field(30 * 24 * 3600.0, ge=0)
    retention_batch: int = Field(200, ge=1, le=10_000)  # root jobs per pass: a pass's work stays bounded
    retention_keep_receipts: bool = False  # keep proof receipts in the object store after their jobs go

    # --- worker ---------------------------------------------------------------
    node_name: str = ""  # defaults to the host name
    worker_tier: str = "cpu_only"
    worker_take_lower_tiers: bool = False
    worker_pool: str = "threads"
    worker_concurrency: int = Field(4, ge=1, le=1024)
    worker_send_events: bool = True  # task events for Flower; off halves broker traffic
    data_dir: Path = Path.home() / ".nexus"

    # --- agent: detection, tiers, heartbeats, supervision -------------
    agent_detector: str = "nvml"  # nvml | fixture
    agent_hardware_fixture: str = ""  # NodeHardware JSON read by the fixture detector
    node_id: str = ""  # the agent sets it in its workers' environment after registering
    # A GPU is AI_FACTORY with this much VRAM *and* a data-centre class name (tokens of the NVML name).
    tier_ai_factory_min_vram_mb: int = Field(40_000, ge=0)
    tier_ai_factory_gpu_classes: str = "H100,H200,H800,H20,GH200,GB200,B100,B200,A100,A800,A40,L40,L40S"
    tier_gpu_peer_min_vram_mb: int = Field(20_000, ge=0)  # 3090/4090: 24 GB
    tier_gpu_infra_min_vram_mb: int = Field(7_000, ge=0)  # 3060/4070: 8-12 GB
    tier_min_compute_capability: str = "7.0"  # older GPUs are ignored (vLLM needs 7.0)
    heartbeat_interval_seconds: float = Field(5.0, gt=0)
    node_stale_after_seconds: float = Field(20.0, gt=0)  # no heartbeat for this long: stale
    node_offline_after_seconds: float = Field(60.0, gt=0)  # ... this long: offline (leases still decide the jobs)
    node_quarantine_after_failures: int = Field(5, ge=1)  # consecutive job failures on one node
    agent_drain_grace_seconds: float = Field(60.0, ge=0)
    agent_restart_backoff_base_seconds: float = Field(1.0, ge=0)
    agent_restart_backoff_max_seconds: float = Field(60.0, ge=0)
    agent_restart_reset_after_seconds: float = Field(60.0, gt=0)  # a child up this long was healthy
    agent_request_timeout_seconds: float = Field(10.0, gt=0)

    # --- multi-node instances: one Ray cluster per instance whose plan spans nodes ------
    # Where the other nodes reach this one (Ray, vLLM's NCCL): empty takes the address of the
    # interface that routes towards the master.
    node_address: str = ""
    ray_executable: str = "ray"
    # Each Ray node of an instance keeps its sockets and logs under here; short, because Ray's Unix
    # socket paths must stay under 108 bytes.
    ray_temp_root: Path = Path("/tmp/nexus-ray")
    # Master: the first port of the blocks of 200 (nexus/models/ray_clusters.py) given to multi-node
    # instances, and how many blocks there are (multi-node instances at once). Below Linux's ephemeral
    # ports (32768 up), so no outgoing connection holds one.
    ray_port_base: int = Field(20000, ge=1024, le=65336)
    ray_port_slots: int = Field(16, ge=1, le=300)

    # --- proof jobs ---------------------------------------------------
    proof_torch_threads: int = Field(0, ge=0, le=1024)  # torch intra-op threads in a worker; 0 keeps torch's default
    proof_poll_seconds: float = Field(0.5, gt=0)  # how often a waiting proof job looks at its segments
    proof_parent_helps: bool = True  # a waiting proof job proves its own queued segments (see nexus/proofs/jobs.py)
    # A retried job waits this long for a node where it has not failed yet before running again where it did.
    node_avoid_failed_seconds: float = Field(120.0, ge=0)
    declined_job_delay_seconds: float = Field(1.0, ge=0)  # a declined message comes back within this (random)

    # --- local read replicas on a worker node (docs/ARCHITECTURE.md, "Replicas for lag-tolerant reads") ---------
    # Empty: no replica, every read goes to the master. Writes always go to the master.
    replica_database_url: str = ""  # hot standby of the master's PostgreSQL (pg_basebackup -R)
    replica_redis_url: str = ""  # read-only Redis replica (replicaof the master)
    replica_s3_endpoint: str = ""  # local MinIO/S3 kept in step with the master's buckets
    replica_s3_access_key: str = ""  # empty: the master's keys (the compose mirror uses them)
    replica_s3_secret_key: str = ""
    # How long a read waits for the standby to replay past the LSN a message carries, then asks the master.
    replica_wait_seconds: float = Field(0.5, ge=0, le=30)
    replica_retry_after_seconds: float = Field(10.0, gt=0)  # a replica that failed is skipped this long
    # Redis replica silent longer than this: read flags from the master (it pings replicas every 10 s when idle).
    replica_max_flag_lag_seconds: float = Field(15.0, gt=0)

    @model_validator(mode="after")
    def _production_refuses_weak_url_passwords(self) -> "Settings":
        """Passwords inside connection URLs (bento.env's POSTGRES_/REDIS_PASSWORD reach us this way)."""
        if self.mode is Mode.PRODUCTION:
            weak = [name for name, password in self.url_passwords().items()
                    if password is not None and is_weak(password)]
            if self.replica_s3_secret_key and is_weak(self.replica_s3_secret_key):
                weak.append("replica_s3_secret_key")
            if weak:
                raise ValueError(
                    "production mode refuses default, example or empty passwords: the password in "
                    + ", ".join(f"NEXUS_{n.upper()}" for n in weak)
                    + " is weak (`just config` generates strong ones)"
                )
        return self

    def url_passwords(self) -> dict[str, str | None]:
        """The password each connection URL carries (None: the URL has none)."""
        from sqlalchemy.engine import make_url

        urls = {"database_url": self.database_url, "redis_url": self.redis_url,
                "replica_database_url": self.replica_database_url, "replica_redis_url": self.replica_redis_url}
        out: dict[str, str | None] = {}
        for name, url in urls.items():
            if url:
                try:
                    out[name] = make_url(url).password
                except Exception:  # not parseable as a URL: the driver will say so; nothing to check here
                    out[name] = None
        return out

    # --- inference: model serving, the /v1 API, batch jobs ----------------
    worker_models: str = ""  # comma-separated catalog names this worker serves (`nexus worker --model`)
    worker_instance_id: str = ""  # the agent names the instance a worker runs (one model); else it adopts one
    inference_concurrency: int = Field(16, ge=1, le=1024)  # requests in flight per serving worker
    inference_max_batch_size: int = Field(8, ge=1, le=256)  # transformers backend: rows per forward pass
    inference_batch_window_ms: float = Field(2.0, ge=0)  # ... and how long it waits to fill a batch
    inference_torch_threads: int = Field(0, ge=0)  # 0: torch's default
    inference_switch_interval_ms: float = Field(1.0, gt=0, le=100)  # a serving worker's GIL switch interval
    inference_heartbeat_seconds: float = Field(2.0, gt=0)  # a serving worker re-announces its instances
    inference_request_timeout_seconds: float = Field(300.0, gt=0)  # /v1 requests give up after this
    inference_stream_ttl_seconds: int = Field(600, ge=10)  # Redis keeps a request's events this long
    # A serving worker writes each request's new text this often (the first delta at once): one hop per
    # interval instead of one per token. vLLM's --stream-interval does the same for its own server.
    inference_stream_interval_ms: float = Field(20.0, ge=0, le=1000)
    # Every instance of the model at its max_concurrent: a /v1 request waits this long for a slot, then 429.
    inference_admission_wait_seconds: float = Field(30.0, ge=0, le=3600)
    # An API process reuses a model's catalog entry this long for /v1 requests (one database checkout
    # fewer per request, where a crowd of them queued on the pool); a change shows within it. 0: read each time.
    inference_catalog_cache_seconds: float = Field(2.0, ge=0, le=60)
    inference_batch_chunk_lines: int = Field(64, ge=1, le=100_000)  # lines per child job of a batch
    vllm_executable: str = "vllm"
    vllm_startup_timeout_seconds: float = Field(900.0, gt=0)

    # --- worker consumption health: each worker probes itself through the broker -------
    worker_probe_interval_seconds: float = Field(10.0, gt=0)  # a probe message to its own queue this often
    # A probe waiting in the queue this long while the worker has free slots: alive but not consuming.
    worker_probe_timeout_seconds: float = Field(30.0, gt=0)
    # A worker whose own probe finds it not consuming shuts down warmly so its supervisor restarts it.
    worker_exit_when_not_consuming: bool = True

    @model_validator(mode="after")
    def _production_refuses_default_secrets(self) -> "Settings":
        if self.mode is Mode.PRODUCTION:
            weak = [name for name, value in self.secrets().items() if is_weak(value)]
            if weak:
                raise ValueError(
                    "production mode refuses default, example or empty secrets: set "
                    + ", ".join(f"NEXUS_{n.upper()}" for n in weak)
                    + " to strong values (`just config` generates them)"
                )
        return self

    def secrets(self) -> dict[str, str]:
        """The secrets this role must hold, each strong in production (a worker holds no master-only one)."""
        held = {"s3_secret_key": self.s3_secret_key, "join_token": self.join_token}
        if self.role is Role.MASTER:
            held.update(admin_token=self.admin_token, flower_password=self.flower_password,
                        worker_database_password=self.worker_database_password,
                        worker_redis_password=self.worker_redis_password)
        return held

    @model_validator(mode="after")
    def _production_keeps_roles_apart(self) -> "Settings":
        """A worker's configuration holds only a worker's credentials; every store is reached with a password."""
        if self.mode is not Mode.PRODUCTION:
            return self
        problems = []
        if self.role is Role.WORKER:
            held = [name for name in MASTER_ONLY_SECRETS if name in self.model_fields_set and getattr(self, name)]
            if held:
                problems.append("a worker holds master-only secrets: remove "
                                + ", ".join(f"NEXUS_{n.upper()}" for n in held))
            user, database = self._database_user()
            if user is not None and user != worker_role_name(database):
                problems.append(f"a worker's NEXUS_DATABASE_URL must log in as the worker role "
                                f"{worker_role_name(database)!r}, not {user!r}")
        passwordless = [name for name, password in self.url_passwords().items() if not password]
        if passwordless:
            problems.append("passwordless connection URLs: "
                            + ", ".join(f"NEXUS_{n.upper()}" for n in passwordless))
        if problems:
            raise ValueError("production mode refuses this configuration: " + "; ".join(problems)
                             + " (DEPLOYMENT.md, \"Credentials\")")
        return self

    def _database_user(self) -> tuple[str | None, str]:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(self.database_url)
        except Exception:  # not a URL: the driver will say so
            return None, ""
        return url.username, url.database or ""

    @property
    def worker_database_url(self) -> str:
        """What a worker's NEXUS_DATABASE_URL is: the master's database, as the worker role."""
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url)
        worker = url.set(username=worker_role_name(url.database or ""),
                         password=self.worker_database_password or None)
        return worker.render_as_string(hide_password=False)

    @property
    def worker_redis_url(self) -> str:
        """What a worker's NEXUS_REDIS_URL is: the master's Redis, as the workers' ACL user (when it has one)."""
        return self._redis_url_as(WORKER_REDIS_USER, self.worker_redis_password)

    @property
    def api_redis_url(self) -> str:
        """The API's NEXUS_REDIS_URL: the master's Redis as the API's own ACL user (when it has one)."""
        return self._redis_url_as(API_REDIS_USER, self.api_redis_password)

    @property
    def reconciler_redis_url(self) -> str:
        """The reconciler's NEXUS_REDIS_URL: the master's Redis as its own ACL user (when it has one)."""
        return self._redis_url_as(RECONCILER_REDIS_USER, self.reconciler_redis_password)

    def _redis_url_as(self, user: str, password: str) -> str:
        if not password:
            return self.redis_url
        from sqlalchemy.engine import make_url

        url = make_url(self.redis_url)  # the same URL grammar: scheme://user:password@host:port/db
        return url.set(username=user, password=password).render_as_string(hide_password=False)

    def for_worker(self) -> "Settings":
        """This master's settings as a worker node gets them: its own database role and Redis user, no
        master-only secret."""
        scoped_s3 = {"s3_access_key": self.worker_s3_access_key, "s3_secret_key": self.worker_s3_secret_key,
                     "worker_s3_access_key": ""} if self.worker_s3_access_key else {}
        return self.model_copy(update={"role": Role.WORKER, "database_url": self.worker_database_url,
                                       "redis_url": self.worker_redis_url, **scoped_s3,
                                       **{name: "" for name in MASTER_ONLY_SECRETS}})

    def worker_bucket_actions(self) -> tuple[str, ...]:
        """What the workers' object-store key may do: read and list model files, nothing else. A job's
        inputs, outputs and receipts are tenant data: a worker reaches those only through the master, by
        the job's lease (nexus.storage.leased, nexus.api.leases)."""
        return (f"Read:{self.bucket_models}", f"List:{self.bucket_models}")

    def worker_environment(self) -> dict[str, str]:
        """NEXUS_* variables of a worker node's processes: every setting of `for_worker`, no master-only one
        (they are left out, not blanked: a worker never learns there is such a setting)."""
        worker = self.for_worker()
        out = {}
        for name in Settings.model_fields:
            if name in MASTER_ONLY_SECRETS:
                continue
            value = getattr(worker, name)
            out[f"NEXUS_{name.upper()}"] = value.value if isinstance(value, Enum) else str(value)
        return out

    @property
    def public_api_url(self) -> str:
        return self.api_url or f"http://{self.api_host}:{self.api_port}"

    @property
    def agent_api_url(self) -> str:
        """Where the agent sends register and heartbeat (its identity stays keyed to public_api_url):
        the node API, derived like public_api_url when neither URL is given; else the user API."""
        if self.node_api_url:
            return self.node_api_url
        if not self.api_url and self.node_api_port:
            return f"http://{self.api_host}:{self.node_api_port}"
        return self.public_api_url

    @property
    def buckets(self) -> tuple[str, ...]:
        return (self.bucket_inputs, self.bucket_outputs, self.bucket_receipts, self.bucket_models)


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (tests, CLI flags) on top."""
    return Settings(**overrides)


# What a process of the cluster takes from a running local cluster's cluster.json (`nexus dev` writes it).
CLUSTER_FILE_SETTINGS = ("api_url", "node_api_url", "database_url", "redis_url", "s3_endpoint", "s3_access_key",
                         "s3_secret_key", "admin_token", "join_token", "flower_user", "flower_password")
_CLUSTER_SERVERS = frozenset({"database_url", "redis_url", "s3_endpoint"})


def load_server_settings(**overrides) -> Settings:
    """Settings for a process of the cluster (master, worker, agent, reconciler, Flower), found the way a
    client finds the cluster: the environment first, else a running local cluster's cluster.json. The file
    is read only when the environment names none of the servers, so one process never mixes two clusters."""
    settings = Settings(**overrides)
    if _CLUSTER_SERVERS & settings.model_fields_set or not settings.cluster_file.is_file():
        return settings
    import json

    cluster = json.loads(settings.cluster_file.read_text())
    found = {name: cluster[name] for name in CLUSTER_FILE_SETTINGS
             if cluster.get(name) and name not in settings.model_fields_set}
    return Settings(**{**found, **overrides})
