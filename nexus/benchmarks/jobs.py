"""The benchmark as a job tree: `benchmark` fans out, one `benchmark_node` per node measures.

    benchmark(payload {sweep, model_spec, nodes: [{name, plan}], priority, node_timeout_seconds})
      ├─ submits one `benchmark_node` per node, pinned to it (requirements {"node": name}:
      │  the node's own queue, which only its workers consume), idempotent per node
      ├─ waits, keeping its progress at the number of cells measured so far
      └─ merges the nodes' cells (a node whose job failed gets error cells) into
         benchmark.json and benchmark.csv in the outputs bucket, and its result

Workers only run jobs and report results; the master records the benchmark's rows
and each node's measured capacity from the finished job (nexus.benchmarks.records).
The parent waits on a worker like any job, on the queue its requirements name
(cpu_only unless the API was told otherwise); a node's job waits for that node's queue.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

from nexus.benchmarks.cells import Cell, failed_cell, to_csv
from nexus.benchmarks.measure import PeakMemory, measure_cell, sized_prompt
from nexus.benchmarks.sweep import Sweep, SweepInvalid
from nexus.jobs.context import JobCancelled, JobContext
from nexus.jobs.notify import ChildNotices
from nexus.jobs.records import Job
from nexus.jobs.registry import JobType
from nexus.models.catalog import BackendKind, ModelSpec
from nexus.models.placement import ParallelismPlan
from nexus.queueing.tiers import Tier

BENCHMARK_TYPE = "benchmark"
NODE_TYPE = "benchmark_node"
FINAL = ("succeeded", "failed", "cancelled")
POLL_SECONDS = 0.5
DEFAULT_NODE_TIMEOUT_SECONDS = 3600
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class BenchmarkTarget:
    """One node to measure: its name, the plan a temporary instance would use there, and whether an
    instance of the model already runs there (its part then goes to that instance's worker)."""

    node: str
    plan: ParallelismPlan
    serving: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.node, "plan": self.plan.to_dict(), "serving": self.serving}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BenchmarkTarget":
        return cls(raw["name"], ParallelismPlan.from_dict(raw.get("plan") or {}), bool(raw.get("serving")))

    def requirements(self, model: str) -> dict[str, Any]:
        """The node's own queue, or the queue of the model's serving workers on that node."""
        return {"node": self.node, "model": model} if self.serving else {"node": self.node}


def spec_to_payload(spec: ModelSpec) -> dict[str, Any]:
    """What a node needs to start the model itself (no catalog read on the worker; no api_key:
    outside OpenAI servers are not benchmarked per node)."""
    return {"name": spec.name, "source": spec.source, "backend": spec.backend.value, "args": dict(spec.args),
            "vram_mb": spec.vram_mb, "min_tier": spec.min_tier.value, "max_model_len": spec.max_model_len}


def spec_from_payload(raw: dict[str, Any]) -> ModelSpec:
    return ModelSpec(raw["name"], raw["source"], BackendKind(raw["backend"]), dict(raw.get("args") or {}),
                     int(raw.get("vram_mb", 0)), Tier(raw.get("min_tier", Tier.CPU_ONLY.value)), raw.get("max_model_len"))


def _check(payload: Any, fields: set[str]) -> dict[str, Any]:
    if not isinstance(payload, dict) or not fields <= set(payload):
        raise ValueError(f"payload needs {sorted(fields)}")
    try:
        Sweep.from_dict(payload["sweep"])
        spec_from_payload(payload["model_spec"])
    except (SweepInvalid, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid benchmark payload: {exc}") from None
    return payload


# --- the parent ---------------------------------------------------------------------------------


def validate_benchmark(payload: Any) -> dict[str, Any]:
    payload = _check(payload, {"sweep", "model_spec", "nodes"})
    nodes = payload["nodes"]
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) and isinstance(n.get("name"), str)
                                                           for n in nodes):
        raise ValueError("payload.nodes must be a non-empty list of {name, plan}")
    return payload


def benchmark_children(payload: dict[str, Any], _settings: Any) -> int:
    return len(payload["nodes"])


def run_benchmark(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    sweep = Sweep.from_dict(payload["sweep"])
    targets = [BenchmarkTarget.from_dict(raw) for raw in payload["nodes"]]
    names = [target.node for target in targets]
    ctx.submit_children([{
        "type": NODE_TYPE, "requirements": target.requirements(sweep.model), "priority": int(payload.get("priority", 5)),
        "payload": {"sweep": payload["sweep"], "model_spec": payload["model_spec"], "plan": target.plan.to_dict()},
        "idempotency_key": f"node-{target.node}",
    } for target in targets])
    timeout = float(payload.get("node_timeout_seconds", DEFAULT_NODE_TIMEOUT_SECONDS))
    children = _wait_for_nodes(ctx, names, sweep, timeout)
    cells: list[Cell] = []
    for name in names:
        cells += _node_cells(name, children.get(name), sweep)
    document = {"benchmark_id": str(ctx.job_id), "sweep": sweep.to_dict(), "nodes": names,
                "cells": [cell.to_dict() for cell in cells]}
    json_key = ctx.write_output(json.dumps(document, indent=1).encode(), name="benchmark.json",
                                content_type="application/json")
    csv_key = ctx.write_output(to_csv(cells).encode(), name="benchmark.csv", content_type="text/csv")
    total = len(names) * sweep.cells_per_node
    ctx.progress(total, total, "all cells measured", force=True)
    instances = {name: (row.result or {}).get("instance") for name, row in children.items() if row.state == "succeeded"}
    return {"_output_key": json_key, "csv_key": csv_key, "model": sweep.model, "nodes": names,
            "instances": instances, "cells": document["cells"], "errors": sum(cell.errors for cell in cells)}


def _wait_for_nodes(ctx: JobContext, names: list[str], sweep: Sweep, timeout: float) -> dict[str, Job]:
    """Each node's job once all are final (or past the timeout: those still waiting are cancelled)."""
    deadline = time.monotonic() + timeout
    total = len(names) * sweep.cells_per_node
    with ctx.child_notices() as notices:
        return _wait_for_node_jobs(ctx, notices, names, sweep, deadline, total)


def _wait_for_node_jobs(ctx: JobContext, notices: ChildNotices, names: list[str], sweep: Sweep, deadline: float,
                        total: int) -> dict[str, Job]:
    while True:
        # Children's keys are "<parent id>:node-<name>" (JobContext.submit_children prefixes the parent).
        by_node = {row.idempotency_key.split(":node-", 1)[1]: row for row in ctx.children()
                   if row.idempotency_key and ":node-" in row.idempotency_key}
        done = sum(_cells_done(row, sweep) for row in by_node.values())
        finished = [row for row in by_node.values() if row.state in FINAL]
        if len(finished) == len(names):
            if any(row.state == "cancelled" for row in finished) and ctx.own_job().cancel_requested:
                # Cancelling the benchmark cancels its node jobs at once, and this attempt hears of its
                # own cancel only at its next lease renewal: without this, it would record them as a result.
                raise JobCancelled(str(ctx.job_id))
            return by_node
        if time.monotonic() > deadline:
            ctx.cancel_children([row.id for row in by_node.values() if row.state not in FINAL],
                                by=f"benchmark {ctx.job_id}: node timeout")
            return {name: row for name, row in by_node.items() if row.state in FINAL}
        ctx.progress(min(done, total), total, f"{len(finished)}/{len(names)} nodes done")
        notices.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())),
                      [row.id for row in by_node.values() if row.state not in FINAL])


def _cells_done(row: Job, sweep: Sweep) -> int:
    if row.state == "succeeded":
        return sweep.cells_per_node
    return int((row.progress or {}).get("done", 0))


def _node_cells(name: str, row: Job | None, sweep: Sweep) -> list[Cell]:
    if row is not None and row.state == "succeeded" and isinstance(row.result, dict):
        return [Cell.from_dict(raw) for raw in row.result.get("cells", [])]
    reason = "the node's job did not finish in time" if row is None or row.state not in FINAL else \
        f"the node's job {row.state}: {row.error or ''}".strip()
    return [failed_cell(name, batch, context, reason) for batch, context in sweep.pairs()]


# --- one node -----------------------------------------------------------------------------------


def validate_node(payload: Any) -> dict[str, Any]:
    return _check(payload, {"sweep", "model_spec"})


def run_node(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    sweep = Sweep.from_dict(payload["sweep"])
    spec = spec_from_payload(payload["model_spec"])
    plan = ParallelismPlan.from_dict(payload.get("plan") or {})
    pairs = sweep.pairs()
    cells: list[Cell] = []
    ctx.progress(0, len(pairs), "starting the model", force=True)
    with _backend(ctx, spec, plan) as (backend, instance), PeakMemory() as memory:
        backend.generate(_warmup_request())  # first-call costs (allocations, compilation) stay out of the cells
        prompts: dict[int, tuple[str, int]] = {}
        for number, (batch, context) in enumerate(pairs, start=1):
            ctx.check_cancelled()
            if context not in prompts:
                prompts[context] = sized_prompt(backend, context)
            prompt, prompt_tokens = prompts[context]
            cells.append(measure_cell(backend, ctx.node, batch, context, prompt, prompt_tokens, sweep.output_tokens,
                                      sweep.repetitions, memory, ctx.check_cancelled))
            ctx.progress(number, len(pairs), f"batch {batch}, context {context}", force=True)
    return {"node": ctx.node, "instance": instance, "cells": [cell.to_dict() for cell in cells]}


def _warmup_request():
    from nexus.inference.types import GenerationRequest, SamplingParams

    return GenerationRequest(prompt="hello", params=SamplingParams(max_tokens=WARMUP_TOKENS))


@contextlib.contextmanager
def _backend(ctx: JobContext, spec: ModelSpec, plan: ParallelismPlan) -> Iterator[tuple[Any, str]]:
    """This worker's own instance of the model when it serves it, else a temporary one, stopped after."""
    from nexus.serving import host

    try:
        serving = host.current().backend_for(spec.name)
    except host.ModelNotServedHere:
        serving = None
    if serving is not None:
        yield serving, "serving"
        return
    from nexus.localservers import free_port
    from nexus.serving.backends import BackendRequest, make_backend
    from nexus.serving.weights import local_model_path

    path = local_model_path(spec, ctx.storage, ctx.settings.data_dir / "models")
    backend = make_backend(BackendRequest(spec, ctx.settings, path, plan, free_port()))
    try:
        yield backend, "temporary"
    finally:
        backend.close()


# Internal: the API resolves the model and the nodes and checks the sweep (nexus/api/benchmarks.py).
benchmark = JobType(name=BENCHMARK_TYPE, run=run_benchmark, validate=validate_benchmark, accepts_input=False,
                    public=False, fan_out=benchmark_children)
benchmark_node = JobType(name=NODE_TYPE, run=run_node, validate=validate_node, accepts_input=False, public=False)
