"""Benchmarks: run a throughput sweep of a catalog model over nodes, read its cells and its plot.

A benchmark is a job of type `benchmark` (cancel it with POST /api/v1/jobs/<id>/cancel);
these routes check the request against the catalog and the fleet, and show what a job
view lacks: the cells, the plot, the JSON and CSV objects. Reading a finished benchmark
(or a node, or placing an instance) first records finished benchmarks' rows and the
nodes' measured capacity (nexus.benchmarks.records).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from apiflask import APIBlueprint
from flask import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import text

from nexus.api.errors import ApiError
from nexus.api.jobs import load_job
from nexus.api.limits import check_priority
from nexus.api.security import caller, require, services
from nexus.api.views import jsonable
from nexus.auth import Role
from nexus.benchmarks import records
from nexus.benchmarks.cells import Cell
from nexus.benchmarks.jobs import BENCHMARK_TYPE, DEFAULT_NODE_TIMEOUT_SECONDS, BenchmarkTarget, spec_to_payload
from nexus.benchmarks.plot import plot_png
from nexus.benchmarks.sweep import MAX_AXIS, MAX_NODES, Sweep, SweepInvalid, check_model_length, check_size
from nexus.jobs import queries
from nexus.jobs.records import Job
from nexus.models import catalog, liveness
from nexus.models.catalog import BackendKind, ModelSpec
from nexus.models.instances import child_name
from nexus.models.placement import PlacementError, PlacementRequest, place
from nexus.nodes.fit import NodeView, Reservation
from nexus.queueing.routing import node_queue

bp = APIBlueprint("benchmarks", __name__, url_prefix="/api/v1/benchmarks", tag="Benchmarks")

PLOT_NAME = "plot.png"
LIST_LIMIT = 50


class BenchmarkRequest(BaseModel):
    """A sweep: every node x batch size x context length is one cell (at most nexus.benchmarks.sweep.MAX_CELLS)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=128, description="a catalog model")
    nodes: list[str] = Field(default_factory=list, max_length=MAX_NODES,
                             description="node names or ids; default: every ready node that can serve the model")
    batch_sizes: list[StrictInt] = Field(max_length=MAX_AXIS, description="requests in flight at once")
    context_lengths: list[StrictInt] = Field(max_length=MAX_AXIS, description="prompt tokens")
    output_tokens: StrictInt = Field(32, description="tokens each request generates (at most; EOS may stop it)")
    repetitions: StrictInt = Field(1, description="times each cell runs")
    priority: StrictInt = Field(5, ge=0, le=9)
    node_timeout_seconds: StrictInt = Field(DEFAULT_NODE_TIMEOUT_SECONDS, ge=10, le=86_400,
                                            description="how long a node's part may wait and run")


@bp.post("")
@bp.input(BenchmarkRequest, arg_name="body")
@bp.doc(security="bearer", responses={201: "queued", 400: "bad model, nodes or sweep (details.field names it)"})
@require(Role.SUBMITTER)
def submit(body: BenchmarkRequest):
    s = services()
    check_priority(caller(), body.priority, s.settings)
    try:
        sweep = Sweep.from_dict(body.model_dump(include={"model", "batch_sizes", "context_lengths", "output_tokens",
                                                         "repetitions"}))
    except SweepInvalid as exc:
        raise ApiError(400, str(exc), {"field": exc.field}, code="invalid_benchmark") from None
    with s.engine.begin() as conn:
        spec = catalog.get_model(conn, sweep.model)
        if spec is None:
            raise ApiError(400, f"model {sweep.model!r} is not in the catalog", {"field": "model"},
                           code="invalid_benchmark")
        targets = _targets(conn, spec, body.nodes)
    try:
        check_model_length(sweep, spec.max_model_len)
        check_size(sweep, len(targets))
    except SweepInvalid as exc:
        raise ApiError(400, str(exc), {"field": exc.field}, code="invalid_benchmark") from None
    payload = {"sweep": sweep.to_dict(), "model_spec": spec_to_payload(spec), "priority": body.priority,
               "node_timeout_seconds": body.node_timeout_seconds,
               "nodes": [target.to_dict() for target in targets]}
    [(row, _created)] = s.submitter.submit_many([{"type": BENCHMARK_TYPE, "payload": payload,
                                                  "priority": body.priority}],
                                                tenant=caller().tenant, allow_internal=True)
    return _view(row), 201


_NODE_ROWS = text("SELECT id, name, queues FROM nodes WHERE state <> 'removed'")


class _CannotServe(Exception):
    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


@dataclass
class _Fleet:
    """The live nodes as a benchmark sees them: names, ids, placement views, whether each takes pinned jobs."""

    names: dict[str, str]  # id -> name
    pinnable: set[str]  # names of nodes whose workers consume their own queue
    views: list[NodeView]
    reservations: list[Reservation]
    serving: set[str]  # ids of nodes where an agent's worker serves the model now

    @classmethod
    def read(cls, conn, model: str) -> "_Fleet":
        from nexus.nodes.reservations import fleet, live_reservations

        rows = conn.execute(_NODE_ROWS).all()
        return cls({str(r.id): r.name for r in rows},
                   {r.name for r in rows if node_queue(r.name) in (r.queues or ())},
                   fleet(conn, gpu_only=False), live_reservations(conn), _serving_nodes(conn, model))

    def ready_names(self) -> list[str]:
        return sorted(self.names[v.node_id] for v in self.views if v.state.takes_work)

    def target(self, spec: ModelSpec, reference: str) -> BenchmarkTarget:
        """The node, the plan a temporary instance of the model would use on it, whether it serves it."""
        node_id = reference if reference in self.names else \
            next((i for i, name in self.names.items() if name == reference), None)
        if node_id is None:
            raise _CannotServe(f"no node is named {reference!r}", reference)
        name = self.names[node_id]
        try:
            plan = place(PlacementRequest(spec.vram_mb, spec.min_tier, node_ids=frozenset({node_id})),
                         self.views, self.reservations, datetime.now(timezone.utc))
        except PlacementError as exc:
            raise _CannotServe(f"node {name!r} cannot serve model {spec.name!r}: {exc}", name) from None
        if name not in self.pinnable:  # an agent from before node queues would never take its part
            raise _CannotServe(f"node {name!r} does not consume its own queue {node_queue(name)!r}: "
                               "upgrade its agent", name)
        return BenchmarkTarget(name, plan, node_id in self.serving)


def _serving_nodes(conn, model: str) -> set[str]:
    """Nodes running a live instance of the model in a worker their agent started: that worker also
    consumes node.<name>.model.<model> (nexus.worker.processes.instance_child), so the benchmark's
    part there measures the running instance instead of starting a second one."""
    live = set(liveness.live_instances(services().redis, model))
    return {str(i["node_id"]) for i in catalog.list_instances(conn, model)
            if i["state"] == "running" and str(i["id"]) in live and i["node_id"]
            and str(i.get("worker") or "").startswith(child_name(i) + "@")}


def _targets(conn, spec: ModelSpec, asked: list[str]) -> list[BenchmarkTarget]:
    """(node name, plan) for every node to measure: those asked for (each must serve the model),
    or every ready node that can."""
    if spec.backend is BackendKind.OPENAI:
        raise ApiError(400, f"model {spec.name!r} is served by an outside server, not by a node",
                       {"field": "model"}, code="invalid_benchmark")
    fleet = _Fleet.read(conn, spec.name)
    targets = []
    for reference in list(dict.fromkeys(asked)) or fleet.ready_names():
        try:
            targets.append(fleet.target(spec, reference))
        except _CannotServe as exc:
            if asked:
                raise ApiError(400, str(exc), {"field": "nodes", "node": exc.node}, code="invalid_benchmark") from None
    if not targets:
        raise ApiError(400, f"no ready node can serve model {spec.name!r}", {"field": "nodes"},
                       code="invalid_benchmark")
    return targets


@bp.get("")
@bp.doc(security="bearer")
def list_benchmarks():
    """The caller's benchmarks (every tenant's for an admin), newest first."""
    where = queries.JobFilter(tenant=None if caller().is_admin else caller().tenant, type=BENCHMARK_TYPE)
    with services().statements.connect() as conn:
        page, _more = queries.list_jobs(conn, where, LIST_LIMIT)
    return {"benchmarks": [_summary(job) for job in page]}


@bp.get("/<uuid:benchmark_id>")
@bp.doc(security="bearer")
def get_benchmark(benchmark_id: uuid.UUID):
    """State, progress (cells measured), the cells so far, links to the plot, the JSON and the CSV."""
    return _view(_load(benchmark_id))


@bp.get("/<uuid:benchmark_id>/plot")
@bp.doc(security="bearer", responses={200: "image/png", 409: "no cell measured yet"})
def get_plot(benchmark_id: uuid.UUID):
    """Output tok/s against batch size: a line per context length, a panel per node (PNG)."""
    job = _load(benchmark_id)
    s = services()
    key = f"jobs/{job.id}/{PLOT_NAME}"
    if job.state == "succeeded" and s.store.exists(s.settings.bucket_outputs, key):
        return Response(s.store.get_bytes(s.settings.bucket_outputs, key), mimetype="image/png")
    cells = _cells(job)
    if not cells:
        raise ApiError(409, f"benchmark {benchmark_id} has no measured cells yet ({job.state})", {"state": job.state})
    png = plot_png(cells, f"{_model(job)}: output tok/s by batch size")
    if job.state == "succeeded":  # final: draw it once
        s.store.put_bytes(s.settings.bucket_outputs, key, png, "image/png")
    return Response(png, mimetype="image/png")


def _load(benchmark_id: uuid.UUID) -> Job:
    job = load_job(benchmark_id)
    if job.type != BENCHMARK_TYPE:
        raise ApiError(404, f"benchmark {benchmark_id} not found (job {benchmark_id} is a {job.type} job)")
    return job


def _model(job: Job) -> str:
    return str(((job.payload or {}).get("sweep") or {}).get("model", ""))


def _cells(job: Job) -> list[Cell]:
    """The recorded rows of a finished benchmark; while it runs, the cells of the nodes done so far."""
    if job.state == "succeeded":
        with services().engine.begin() as conn:
            records.record_finished(conn)
            return records.cells(conn, job.id)
    with services().statements.connect() as conn:
        children = queries.children(conn, job.id)
    return [Cell.from_dict(raw) for child in children if child.state == "succeeded" and isinstance(child.result, dict)
            for raw in child.result.get("cells", [])]


_SUMMARY_FIELDS = ("id", "state", "tenant", "priority", "progress", "error", "created_at", "started_at",
                   "finished_at")


def _summary(job: Job) -> dict[str, Any]:
    payload = job.payload or {}
    view = {name: jsonable(getattr(job, name)) for name in _SUMMARY_FIELDS}
    view.update({"model": _model(job), "sweep": payload.get("sweep"),
                 "nodes": [node["name"] for node in payload.get("nodes", [])],
                 "plot_url": f"/api/v1/benchmarks/{job.id}/plot"})
    return view


def _view(job: Job) -> dict[str, Any]:
    s = services()
    view = _summary(job)
    view["cells"] = [cell.to_dict() for cell in _cells(job)]
    result = job.result if isinstance(job.result, dict) else {}
    view["instances"] = result.get("instances", {})  # node -> "serving" (its running instance) or "temporary"
    bucket = s.settings.bucket_outputs
    view["json_url"] = s.store.presigned_get(bucket, job.output_key) if job.output_key else None
    view["csv_url"] = s.store.presigned_get(bucket, result["csv_key"]) if result.get("csv_key") else None
    return view
