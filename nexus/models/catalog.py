"""The model catalog and instance rows: typed values and the SQL that reads and writes them.

Pure validation (`check_args`) plus small functions over a SQLAlchemy
connection; the API, the serving workers and (through `report_instance_state`)
the node agent all go through these.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from nexus.db.functions import DefinerFunction
from nexus.models.placement import ParallelismPlan
from nexus.queueing.tiers import Tier

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # what routing.Requirements accepts
RESERVED_NAME_SEGMENT = "instances"
S3_SCHEME = "s3://"


class BackendKind(str, Enum):
    TRANSFORMERS = "transformers"  # in the worker process, CPU or one GPU
    VLLM = "vllm"  # a supervised `vllm serve` subprocess
    OPENAI = "openai"  # any OpenAI-compatible server, by URL


class InstanceState(str, Enum):
    PENDING = "pending"  # placed, waiting for a worker or agent to take it
    DOWNLOADING = "downloading"  # weights coming from the object store
    STARTING = "starting"  # loading the model / starting the server
    RUNNING = "running"
    ERROR = "error"
    STOPPED = "stopped"  # asked to stop (DELETE); terminal


VLLM_TASKS = frozenset({"generate", "embed"})  # embed: a pooling server for /v1/embeddings only
ACTIVE_STATES = (InstanceState.PENDING, InstanceState.DOWNLOADING, InstanceState.STARTING, InstanceState.RUNNING)
_ARG_KEYS = {
    BackendKind.TRANSFORMERS: {"max_batch_size", "batch_window_ms", "torch_threads", "device"},
    BackendKind.VLLM: {"extra_args", "served_model_name", "task"},
    BackendKind.OPENAI: {"url", "served_model_name", "api_key"},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # a local path on the workers, or s3://bucket/prefix
    backend: BackendKind = BackendKind.TRANSFORMERS
    args: dict[str, Any] = field(default_factory=dict)
    vram_mb: int = 0
    min_tier: Tier = Tier.CPU_ONLY
    max_model_len: int | None = None
    created_at: datetime | None = field(default=None, compare=False)  # set by the database

    @property
    def served_model_name(self) -> str:
        """The name the backend server knows the model by (an outside server may call it otherwise)."""
        return str(self.args.get("served_model_name") or self.name)

    @property
    def s3_location(self) -> tuple[str, str] | None:
        if not self.source.startswith(S3_SCHEME):
            return None
        bucket, _, prefix = self.source[len(S3_SCHEME):].partition("/")
        return bucket, prefix

    def view(self) -> dict:
        return {"name": self.name, "source": self.source, "backend": self.backend.value, "args": _public_args(self.args),
                "vram_mb": self.vram_mb, "min_tier": self.min_tier.value, "max_model_len": self.max_model_len}

    @classmethod
    def from_row(cls, row) -> "ModelSpec":
        return cls(name=row["name"], source=row["source"], backend=BackendKind(row["backend"]), args=dict(row["args"]),
                   vram_mb=row["vram_mb"], min_tier=Tier(row["min_tier"]), max_model_len=row["max_model_len"],
                   created_at=row.get("created_at"))


def _public_args(args: dict) -> dict:
    return {k: ("***" if k == "api_key" else v) for k, v in args.items()}


def check_spec(spec: ModelSpec) -> None:
    """ValueError saying what is wrong with a catalog entry."""
    if not re.match(MODEL_NAME_PATTERN, spec.name):
        raise ValueError("name must be letters, digits and . _ : / - (at most 128)")
    if RESERVED_NAME_SEGMENT in spec.name.split("/"):
        raise ValueError(f"no part of a name between slashes may be {RESERVED_NAME_SEGMENT!r} (the API's "
                         f"/models/<name>/{RESERVED_NAME_SEGMENT} routes would swallow it)")
    unknown = set(spec.args) - _ARG_KEYS[spec.backend]
    if unknown:
        raise ValueError(f"unknown args for backend {spec.backend.value}: {sorted(unknown)}; "
                         f"allowed: {sorted(_ARG_KEYS[spec.backend])}")
    if spec.backend is BackendKind.OPENAI and not str(spec.args.get("url", "")).startswith(("http://", "https://")):
        raise ValueError("the openai backend needs args.url, the server's base URL (e.g. http://host:8000/v1)")
    extra = spec.args.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise ValueError("args.extra_args must be a list of strings (vLLM flags)")
    if spec.args.get("task", "generate") not in VLLM_TASKS:
        raise ValueError(f"args.task must be one of {sorted(VLLM_TASKS)}")
    if spec.backend is BackendKind.VLLM and spec.vram_mb <= 0:
        raise ValueError("a vllm model needs vram_mb, the VRAM estimate placement uses")
    if spec.backend is not BackendKind.OPENAI and not spec.source:
        raise ValueError("source is required: a local path or s3://bucket/prefix")


# --- models ----------------------------------------------------------------------

_MODEL_PARAMS = bindparam("args", type_=JSONB)


def insert_model(conn: Connection, spec: ModelSpec, replace: bool = False) -> bool:
    """False when a model of that name exists (and `replace` is off)."""
    conflict = ("DO UPDATE SET source = EXCLUDED.source, backend = EXCLUDED.backend, args = EXCLUDED.args, "
                "vram_mb = EXCLUDED.vram_mb, min_tier = EXCLUDED.min_tier, max_model_len = EXCLUDED.max_model_len"
                if replace else "DO NOTHING")
    row = conn.execute(text(
        "INSERT INTO models (name, source, backend, args, vram_mb, min_tier, max_model_len) "
        f"VALUES (:name, :source, :backend, :args, :vram_mb, :min_tier, :max_model_len) ON CONFLICT (name) {conflict} "
        "RETURNING name").bindparams(_MODEL_PARAMS),
        {"name": spec.name, "source": spec.source, "backend": spec.backend.value, "args": spec.args,
         "vram_mb": spec.vram_mb, "min_tier": spec.min_tier.value, "max_model_len": spec.max_model_len}).first()
    return row is not None


def get_model(conn: Connection, name: str) -> ModelSpec | None:
    row = conn.execute(text("SELECT * FROM models WHERE name = :name"), {"name": name}).mappings().first()
    return ModelSpec.from_row(row) if row else None


def list_models(conn: Connection) -> list[ModelSpec]:
    return [ModelSpec.from_row(r) for r in conn.execute(text("SELECT * FROM models ORDER BY name")).mappings()]


def delete_model(conn: Connection, name: str) -> bool:
    """Its instances go with it (the serving workers notice at their next heartbeat)."""
    return conn.execute(text("DELETE FROM models WHERE name = :name RETURNING name"), {"name": name}).first() is not None


# --- instances -------------------------------------------------------------------


def create_instance(conn: Connection, model: str, plan: ParallelismPlan, record: dict | None = None) -> dict:
    """`record`: the plan as the row keeps it, when it carries more than the plan (a Ray cluster)."""
    head = plan.head
    row = conn.execute(text(
        "INSERT INTO model_instances (id, model, node_id, gpus, plan) VALUES (:id, :model, :node, :gpus, :plan) "
        "RETURNING *").bindparams(bindparam("plan", type_=JSONB)),
        {"id": uuid.uuid4(), "model": model, "node": head.node_id if head else None,
         "gpus": list(head.gpus) if head else [], "plan": record or plan.to_dict()}).mappings().one()
    return dict(row)


def replace_instance(conn: Connection, instance_id, plan: ParallelismPlan, record: dict, note: str) -> None:
    """Give an instance a new plan (placed again): pending, for the agents of its new nodes."""
    head = plan.head
    conn.execute(text(
        "UPDATE model_instances SET plan = :plan, node_id = :node, gpus = :gpus, state = 'pending', "
        "error = :error, worker = NULL, worker_token = NULL, updated_at = now() WHERE id = :id").bindparams(
        bindparam("plan", type_=JSONB)),
        {"id": instance_id, "plan": record, "node": head.node_id if head else None,
         "gpus": list(head.gpus) if head else [], "error": note[:2000]})


def list_instances(conn: Connection, model: str | None = None, active_only: bool = False) -> list[dict]:
    where, params = ["TRUE"], {}
    if model:
        where.append("model = :model")
        params["model"] = model
    if active_only:
        where.append("state IN ('pending', 'downloading', 'starting', 'running')")
    rows = conn.execute(text(f"SELECT * FROM model_instances WHERE {' AND '.join(where)} ORDER BY created_at"), params)
    return [dict(r) for r in rows.mappings()]


def get_instance(conn: Connection, instance_id: uuid.UUID) -> dict | None:
    row = conn.execute(text("SELECT * FROM model_instances WHERE id = :id"), {"id": instance_id}).mappings().first()
    return dict(row) if row else None


def set_instance_state(conn: Connection, instance_id, state: InstanceState, error: str | None = None,
                       worker: str | None = None) -> dict | None:
    """Move an active instance to `state`; a stopped one stays stopped (None is returned)."""
    row = conn.execute(text(
        "UPDATE model_instances SET state = :state, error = :error, worker = COALESCE(:worker, worker), "
        "worker_token = CASE WHEN :state = 'pending' THEN NULL ELSE worker_token END, "  # free for the next taker
        "updated_at = now(), heartbeat_at = now() WHERE id = :id AND state <> 'stopped' RETURNING *"),
        {"id": instance_id, "state": state.value, "error": error, "worker": worker}).mappings().first()
    return dict(row) if row else None


def stop_instance(conn: Connection, instance_id) -> dict | None:
    row = conn.execute(text(
        "UPDATE model_instances SET state = 'stopped', updated_at = now() WHERE id = :id RETURNING *"),
        {"id": instance_id}).mappings().first()
    return dict(row) if row else None


# --- a serving worker's own instance -------------------------------------------------------
# The worker role writes model_instances only through these functions (nexus.jobs.worker_role): taking an
# instance (adopting a pending one placed on its node, the one its agent named, or a new one of its own)
# draws a token only the taker learns; every later write of that row (its state, its heartbeat) must show
# it, so a worker cannot write another node's or another worker's instance, even knowing its id (the API
# lists ids; Redis announces them).
_HELD_RETURNS = {"id": "model_instances.id%TYPE", "state": "model_instances.state%TYPE",
                 "plan": "model_instances.plan%TYPE", "worker_token": "uuid"}
_HELD_COLUMNS = "i.id, i.state, i.plan, i.worker_token"
_TAKEN = ("state = 'starting', worker = :worker, node_id = COALESCE(i.node_id, :node), error = NULL, "
          "worker_token = gen_random_uuid(), updated_at = now(), heartbeat_at = now()")

_ADOPT = DefinerFunction("nexus_w_adopt_instance", {"model": "text", "node": "text", "worker": "text"}, _HELD_RETURNS, f"""
    UPDATE model_instances i SET {_TAKEN}
    WHERE i.id = (SELECT p.id FROM model_instances p WHERE p.model = :model AND p.state = 'pending'
                    AND (p.node_id IS NULL OR p.node_id = :node)
                  ORDER BY p.created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING {_HELD_COLUMNS}""")
_TAKE = DefinerFunction("nexus_w_take_instance", {"id": "uuid", "model": "text", "node": "text", "worker": "text"},
                        _HELD_RETURNS, f"""
    UPDATE model_instances i SET {_TAKEN}
    WHERE i.id = :id AND i.model = :model AND i.state <> 'stopped' AND (i.node_id IS NULL OR i.node_id = :node)
    RETURNING {_HELD_COLUMNS}""")
_START_UNPLANNED = DefinerFunction("nexus_w_start_unplanned_instance", {"model": "text", "node": "text", "worker": "text"},
                                   _HELD_RETURNS, f"""
    INSERT INTO model_instances AS i (id, model, state, node_id, worker, plan, heartbeat_at, worker_token)
    SELECT gen_random_uuid(), m.name, 'starting', :node, :worker, '{{"strategy": "cpu", "stages": []}}'::jsonb,
           now(), gen_random_uuid()
    FROM models m WHERE m.name = :model
    RETURNING {_HELD_COLUMNS}""")
_SET_HELD_STATE = DefinerFunction(
    "nexus_w_set_instance_state", {"id": "uuid", "token": "uuid", "state": "text", "error": "text", "worker": "text"},
    _HELD_RETURNS, f"""
    UPDATE model_instances i SET state = :state, error = :error, worker = COALESCE(:worker, i.worker),
           updated_at = now(), heartbeat_at = now(),
           worker_token = CASE WHEN :state IN ('pending', 'stopped') THEN NULL ELSE i.worker_token END
    WHERE i.id = :id AND i.worker_token = :token AND i.state <> 'stopped'
    RETURNING {_HELD_COLUMNS}""")
_HELD_HEARTBEAT = DefinerFunction(
    "nexus_w_instance_heartbeat", {"id": "uuid", "token": "uuid", "model": "text", "node": "text", "worker": "text"},
    {"state": "model_instances.state%TYPE"}, """
    WITH beat AS (
        UPDATE model_instances i SET heartbeat_at = now() WHERE i.id = :id AND i.worker_token = :token
        RETURNING i.state
    ), written_again AS (
        INSERT INTO model_instances (id, model, state, node_id, worker, heartbeat_at, worker_token)
        SELECT :id, m.name, 'running', :node, :worker, now(), :token FROM models m
        WHERE m.name = :model AND NOT EXISTS (SELECT 1 FROM model_instances x WHERE x.id = :id)
        RETURNING state
    )
    SELECT state FROM beat UNION ALL SELECT state FROM written_again""")

WORKER_INSTANCE_WRITES = (_ADOPT, _TAKE, _START_UNPLANNED, _SET_HELD_STATE, _HELD_HEARTBEAT)


def _held(rows) -> dict | None:
    return dict(rows[0]) if rows else None


def adopt_held_instance(conn: Connection, model: str, node_id: str | None, worker: str) -> dict | None:
    """Take the oldest pending instance of `model` placed on this node (or on no node); with its token."""
    return _held(_ADOPT.execute(conn, {"model": model, "node": node_id, "worker": worker}))


def take_held_instance(conn: Connection, instance_id, model: str, node_id: str | None, worker: str) -> dict | None:
    """The instance an agent started this worker for (again, after a restart), if it is placed on this node
    (or on none); None if stopped, unknown or another node's."""
    return _held(_TAKE.execute(conn, {"id": instance_id, "model": model, "node": node_id, "worker": worker}))


def start_held_instance(conn: Connection, model: str, node_id: str | None, worker: str) -> dict | None:
    """A worker started to serve a model with nothing deployed records its own instance (None: no such model)."""
    return _held(_START_UNPLANNED.execute(conn, {"model": model, "node": node_id, "worker": worker}))


def set_held_instance_state(conn: Connection, instance_id, token, state: InstanceState, error: str | None = None,
                            worker: str | None = None) -> dict | None:
    """The holder moves its instance to `state`; None when stopped, or no longer held with this token.
    Leaving it pending or stopped lets it go: the next worker takes it with a token of its own."""
    return _held(_SET_HELD_STATE.execute(conn, {"id": instance_id, "token": token, "state": state.value,
                                                "error": error, "worker": worker}))


def held_instance_heartbeat(conn: Connection, instance_id, token, model: str, node_id: str | None,
                            worker: str) -> str | None:
    """The holder's instance is alive: its state (stopped: stop serving). A row that vanished while the model
    still exists is written again (the worker is the witness that it runs); None when the model is gone or
    the instance is held by someone else now."""
    rows = _HELD_HEARTBEAT.execute(conn, {"id": instance_id, "token": token, "model": model, "node": node_id,
                                          "worker": worker})
    return rows[0]["state"] if rows else None


def instance_view(row: dict, live: bool | None = None) -> dict:
    view = {"id": str(row["id"]), "model": row["model"], "state": row["state"], "node_id": row["node_id"],
            "gpus": list(row["gpus"] or []), "plan": _public_plan(row["plan"]), "worker": row["worker"],
            "error": row["error"],
            "heartbeat_at": _iso(row["heartbeat_at"]), "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"])}
    if live is not None:
        view["live"] = live
    return view


def _public_plan(plan: dict | None) -> dict | None:
    """The plan as the API shows it: a Ray cluster's token stays with the master and the member nodes."""
    if not plan or "ray" not in plan:
        return plan
    return {**plan, "ray": {"port_base": plan["ray"]["port_base"]}}


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None
