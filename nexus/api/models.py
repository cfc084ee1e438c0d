"""Models and their instances: declare, list, delete; deploy (placement), list, stop, report state."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from apiflask import APIBlueprint
from pydantic import BaseModel, ConfigDict, Field
from werkzeug.routing import PathConverter

from nexus.api.errors import ApiError
from nexus.api.security import require, services
from nexus.auth import Role
from nexus.models import catalog, liveness
from nexus.models.catalog import BackendKind, InstanceState, ModelSpec
from nexus.models import ray_clusters
from nexus.models.placement import (MAX_PIPELINE_STAGES, PENDING_RESERVATION, PlacementError, PlacementRequest,
                                    pending_reservations, place)
from nexus.queueing.tiers import Tier

bp = APIBlueprint("models", __name__, url_prefix="/api/v1/models", tag="Models")


class ModelNameConverter(PathConverter):
    """A model name in a URL: slashes allowed (`org/model`), but never a part that is `instances`, so
    `/models/<name>` cannot swallow `/models/<name>/instances[/<id>]` and answer for routes (and methods)
    that are not its own. The catalog refuses such names (`catalog.check_spec`)."""

    _part = rf"(?!{catalog.RESERVED_NAME_SEGMENT}(?:/|$))[^/]+"
    regex = rf"{_part}(?:/{_part})*"


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=catalog.MODEL_NAME_PATTERN, description="what clients pass as `model`")
    source: str = Field("", max_length=1024, description="a local path on the workers or s3://bucket/prefix")
    backend: BackendKind = BackendKind.TRANSFORMERS
    args: dict[str, Any] = Field(default_factory=dict,
                                 description="backend options: extra_args (vllm), url/api_key (openai), ...")
    vram_mb: int = Field(0, ge=0, le=10_000_000, description="VRAM the model needs in all (weights + KV cache)")
    min_tier: Tier = Tier.CPU_ONLY
    max_model_len: int | None = Field(None, ge=1, le=10_000_000)


# A node's id or name. No control characters: PostgreSQL refuses a NUL in text (that was a 500).
NodeReference = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: Literal[1, 2, 4, 8] | None = Field(None, description="fixed; placement chooses if unset")
    pipeline_parallel_size: int | None = Field(None, ge=1, le=MAX_PIPELINE_STAGES)
    nodes: list[NodeReference] = Field(default_factory=list, max_length=256,
                                       description="place only on these nodes (ids or names)")


class StateReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: InstanceState
    error: str | None = Field(None, max_length=8000)
    worker: str | None = Field(None, max_length=255)


# --- answers: each view's answer passes through its model, and the OpenAPI document shows the same ---
class InstanceView(BaseModel):
    id: str = Field(json_schema_extra={"format": "uuid"})
    model: str
    state: InstanceState
    node_id: str | None = Field(description="the head node; null while unplaced (a CPU model any worker adopts)")
    gpus: list[int]
    plan: dict[str, Any] = Field(description="strategy, tensor/pipeline parallel sizes, stages (node, GPUs)")
    worker: str | None
    error: str | None
    heartbeat_at: str | None = Field(json_schema_extra={"format": "date-time"})
    created_at: str | None = Field(json_schema_extra={"format": "date-time"})
    updated_at: str | None = Field(json_schema_extra={"format": "date-time"})
    live: bool | None = Field(None, description="announced itself in the last seconds (can take requests)")


class LoadView(BaseModel):
    capacity: int = Field(description="requests its live instances run at once (their max_concurrent)")
    in_flight: int = Field(description="requests holding a serving slot now")
    waiting: int = Field(description="requests waiting for a slot (each gets 429 after the admission bound)")


class ModelView(BaseModel):
    name: str
    source: str
    backend: BackendKind
    args: dict[str, Any] = Field(description="backend options (an api_key shown as ***)")
    vram_mb: int
    min_tier: Tier
    max_model_len: int | None
    live_instances: int
    requests: LoadView = Field(description="its /v1 requests now, over every API process")
    instances: list[InstanceView]


class ModelList(BaseModel):
    models: list[ModelView]


class InstanceList(BaseModel):
    instances: list[InstanceView]


class Deleted(BaseModel):
    deleted: str
    stopped_instances: int


def _spec(name: str) -> ModelSpec:
    with services().statements.connect() as conn:
        spec = catalog.get_model(conn, name)
    if spec is None:
        raise ApiError(404, f"model {name!r} not found")
    return spec


def _model_view(spec: ModelSpec, instances: list[dict]) -> dict:
    live = set(liveness.live_instances(services().redis, spec.name))
    return {**spec.view(), "live_instances": len(live), "requests": asdict(services().admission.load(spec.name)),
            "instances": [catalog.instance_view(i, str(i["id"]) in live) for i in instances]}


@bp.post("")
@bp.input(ModelRequest, arg_name="body")
@bp.output(ModelView, status_code=201, description="declared")
@bp.doc(security="bearer", responses={409: "a model of that name exists"})
@require()
def create_model(body: ModelRequest):
    spec = ModelSpec(body.name, body.source, body.backend, body.args, body.vram_mb, body.min_tier, body.max_model_len)
    try:
        catalog.check_spec(spec)
    except ValueError as exc:
        raise ApiError(400, str(exc), {"field": "args" if "args" in str(exc) else "body"}) from None
    with services().engine.begin() as conn:
        if not catalog.insert_model(conn, spec):
            raise ApiError(409, f"model {body.name!r} exists; delete it first to change it")
    return _model_view(spec, []), 201


@bp.get("")
@bp.output(ModelList)
@bp.doc(security="bearer")
def list_models():
    with services().statements.connect() as conn:
        specs = catalog.list_models(conn)
        instances = catalog.list_instances(conn)
    return {"models": [_model_view(s, [i for i in instances if i["model"] == s.name]) for s in specs]}


@bp.get("/<model_name:name>")
@bp.output(ModelView)
@bp.doc(security="bearer")
def get_model(name: str):
    spec = _spec(name)
    with services().statements.connect() as conn:
        return _model_view(spec, catalog.list_instances(conn, name))


@bp.delete("/<model_name:name>")
@bp.output(Deleted)
@bp.doc(security="bearer")
@require()
def delete_model(name: str):
    """Its instances stop: serving workers see it at their next heartbeat."""
    _spec(name)
    with services().engine.begin() as conn:
        instances = catalog.list_instances(conn, name)
        catalog.delete_model(conn, name)
    for instance in instances:
        liveness.withdraw(services().redis, name, str(instance["id"]))
    return {"deleted": name, "stopped_instances": len(instances)}


@bp.post("/<model_name:name>/instances")
@bp.input(DeployRequest, arg_name="body")
@bp.output(InstanceView, status_code=201, description="placed, pending")
@bp.doc(security="bearer", responses={409: "no node can take it"})
@require()
def deploy(name: str, body: DeployRequest):
    spec = _spec(name)
    now = datetime.now(timezone.utc)
    with services().engine.begin() as conn:
        node_ids = _node_ids(conn, body.nodes)
        request = PlacementRequest(spec.vram_mb if spec.backend is not BackendKind.OPENAI else 0, spec.min_tier,
                                   body.tensor_parallel_size, body.pipeline_parallel_size, frozenset(node_ids))
        # A CPU model goes to a node only when the deploy names nodes (their agents then run it);
        # otherwise it stays unplaced, for any `nexus worker --model` to adopt.
        placeable = request.wants_gpu or body.nodes
        nodes, reservations = _fleet(conn, gpu_only=request.wants_gpu) if placeable else ([], [])
        reservations += pending_reservations(catalog.list_instances(conn, active_only=True), now + PENDING_RESERVATION)
        try:
            plan = place(request, nodes, reservations, now, _measured(conn, name) if placeable else None)
            # A plan across nodes runs on a Ray cluster of its own: a port block and a token for its members.
            cluster = ray_clusters.allocate(conn, services().settings) if plan.multi_node else None
        except PlacementError as exc:
            raise ApiError(409, str(exc), {"vram_mb": spec.vram_mb, "min_tier": spec.min_tier.value},
                           code="no_capacity") from None
        if plan.multi_node:
            _check_multi_node(spec)
        instance = catalog.create_instance(conn, name, plan, ray_clusters.plan_record(plan, cluster))
    return catalog.instance_view(instance, False), 201


def _measured(conn, model: str) -> dict[str, float]:
    """Node id -> the model's measured output tok/s: placement prefers the fastest node that fits."""
    from nexus.benchmarks import records

    records.record_finished(conn)
    return records.capacity_by_node_id(conn, model)


def _node_ids(conn, references: list[str]) -> list[str]:
    """The ids of the nodes a deploy names by id or name; 400 naming those that match no live node."""
    from nexus.nodes.store import resolve_node_ids

    if not references:
        return []
    resolved = resolve_node_ids(conn, references)
    unknown = [reference for reference, node_id in resolved.items() if node_id is None]
    if unknown:
        raise ApiError(400, f"no live node is named or has the id {', '.join(map(repr, unknown))}",
                       {"field": "nodes", "unknown": unknown})
    return [node_id for node_id in resolved.values() if node_id is not None]


def _check_multi_node(spec: ModelSpec) -> None:
    """A plan across nodes is vLLM's on Ray, and every member's workers read the weights from the same path."""
    if spec.backend is not BackendKind.VLLM:
        raise ApiError(409, f"a plan across nodes needs the vllm backend (model {spec.name!r} uses "
                            f"{spec.backend.value}); pin tensor_parallel_size/nodes to one node",
                       {"backend": spec.backend.value}, code="unsupported_plan")
    if spec.s3_location:
        raise ApiError(409, "a plan across nodes needs the model at a path every member node sees (shared "
                            "storage): vLLM's workers on the other nodes read it there; only the head downloads "
                            "s3:// sources", {"source": spec.source}, code="unsupported_plan")


def _fleet(conn, gpu_only: bool):
    """The (GPU) nodes and their live reservations, as the node agent records them ."""
    from nexus.nodes.reservations import fleet, live_reservations

    return fleet(conn, gpu_only), live_reservations(conn)


@bp.get("/<model_name:name>/instances")
@bp.output(InstanceList)
@bp.doc(security="bearer")
def list_instances(name: str):
    _spec(name)
    live = set(liveness.live_instances(services().redis, name))
    with services().statements.connect() as conn:
        return {"instances": [catalog.instance_view(i, str(i["id"]) in live)
                              for i in catalog.list_instances(conn, name)]}


def _instance(name: str, instance_id: uuid.UUID) -> dict:
    with services().statements.connect() as conn:
        row = catalog.get_instance(conn, instance_id)
    if row is None or row["model"] != name:
        raise ApiError(404, f"instance {instance_id} of model {name!r} not found")
    return row


@bp.delete("/<model_name:name>/instances/<uuid:instance_id>")
@bp.output(InstanceView)
@bp.doc(security="bearer")
@require()
def stop_instance(name: str, instance_id: uuid.UUID):
    """Stopped at once for routing (no new requests reach it); its worker frees it at the next heartbeat."""
    _instance(name, instance_id)
    with services().engine.begin() as conn:
        row = catalog.stop_instance(conn, instance_id)
    liveness.withdraw(services().redis, name, str(instance_id))
    return catalog.instance_view(row, False)


@bp.put("/<model_name:name>/instances/<uuid:instance_id>/state")
@bp.input(StateReport, arg_name="report")
@bp.output(InstanceView)
@bp.doc(security="bearer", summary="Report an instance's state (node agents and workers)",
        responses={409: "the instance was stopped; it stays stopped"})
@require(Role.WORKER)
def report_state(name: str, instance_id: uuid.UUID, report: StateReport):
    _instance(name, instance_id)
    with services().engine.begin() as conn:
        row = catalog.set_instance_state(conn, instance_id, report.state, report.error, report.worker)
    if row is None:
        raise ApiError(409, "the instance was stopped; it stays stopped", {"state": "stopped"})
    return catalog.instance_view(row)
