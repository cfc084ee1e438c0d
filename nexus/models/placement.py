"""Placement: which node(s) and GPUs serve a model instance, and with which parallelism plan.

A pure function over node descriptions (`nexus.nodes.fit.NodeView`, what the
master knows from heartbeats) and live reservations. The strategies are those
of vLLM's distributed serving guide (and seed 002):

    single_gpu          the model fits one GPU
    tensor_parallel     one node, 2/4/8 GPUs, every layer split across them
    pipeline_parallel   layers split into stages: on one node when the GPU count
                        does not suit tensor parallelism, or one GPU per node
    hybrid_tp_pp        tensor parallel inside each node, one pipeline stage per node
    cpu                 no GPU wanted: any worker serving the model takes it

Candidates are tried from the fewest GPUs up and, at equal GPU count, with the
fewest pipeline stages (tensor parallelism within a node is faster), so a
placement never takes more of the cluster than the model needs.

Among the nodes that fit, one whose benchmark measured the model (`measured`:
node id -> output tok/s, nexus.benchmarks) comes first, the fastest first;
nodes nobody measured follow in the VRAM order of `can_fit`. Free memory says
whether a model fits, not how fast it runs: a 4090 and an H100 with the same
free VRAM serve at very different speeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Iterable, Mapping, Sequence

from nexus.nodes.fit import NodeFit, NodeView, Reservation, can_fit
from nexus.queueing.tiers import Tier

TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)  # attention heads divide by these in practice; vLLM requires it
MAX_PIPELINE_STAGES = 8
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
MIN_GPU_MEMORY_UTILIZATION = 0.05
# How long a placed instance's VRAM stays promised while it starts (its real use shows in heartbeats after).
PENDING_RESERVATION = timedelta(minutes=30)


class Strategy(str, Enum):
    CPU = "cpu"
    SINGLE_GPU = "single_gpu"
    TENSOR_PARALLEL = "tensor_parallel"
    PIPELINE_PARALLEL = "pipeline_parallel"
    HYBRID_TP_PP = "hybrid_tp_pp"

    @classmethod
    def of(cls, tensor_parallel: int, pipeline_parallel: int) -> "Strategy":
        if tensor_parallel > 1 and pipeline_parallel > 1:
            return cls.HYBRID_TP_PP
        if tensor_parallel > 1:
            return cls.TENSOR_PARALLEL
        if pipeline_parallel > 1:
            return cls.PIPELINE_PARALLEL
        return cls.SINGLE_GPU


@dataclass(frozen=True)
class Stage:
    """GPUs of one node taking part in the instance (one pipeline stage, or all of them on one node)."""

    node_id: str
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class ParallelismPlan:
    strategy: Strategy
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    stages: tuple[Stage, ...] = ()  # empty for an unplaced CPU instance
    per_gpu_mb: int = 0
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(stage.node_id for stage in self.stages))

    @property
    def multi_node(self) -> bool:
        return len(self.node_ids) > 1

    @property
    def head(self) -> Stage | None:
        """The stage whose node runs the server (vLLM's head; Ray brings in the others)."""
        return self.stages[0] if self.stages else None

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy.value,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "stages": [{"node_id": s.node_id, "gpus": list(s.gpus)} for s in self.stages],
            "per_gpu_mb": self.per_gpu_mb,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ParallelismPlan":
        return cls(
            strategy=Strategy(data.get("strategy", Strategy.CPU.value)),
            tensor_parallel_size=int(data.get("tensor_parallel_size", 1)),
            pipeline_parallel_size=int(data.get("pipeline_parallel_size", 1)),
            stages=tuple(Stage(s["node_id"], tuple(s["gpus"])) for s in data.get("stages", ())),
            per_gpu_mb=int(data.get("per_gpu_mb", 0)),
            gpu_memory_utilization=float(data.get("gpu_memory_utilization", DEFAULT_GPU_MEMORY_UTILIZATION)),
        )


@dataclass(frozen=True)
class PlacementRequest:
    vram_mb: int  # the whole model: weights plus room for its KV cache
    min_tier: Tier = Tier.CPU_ONLY  # GPUs of this tier or a more capable one
    tensor_parallel_size: int | None = None  # fixed sizes, or None to choose
    pipeline_parallel_size: int | None = None
    node_ids: frozenset[str] = field(default_factory=frozenset)  # only these nodes, when not empty

    @property
    def wants_gpu(self) -> bool:
        return self.vram_mb > 0 or self.min_tier is not Tier.CPU_ONLY


class PlacementError(ValueError):
    """No node can take the instance; the message says what was missing."""


def place(request: PlacementRequest, nodes: Sequence[NodeView], reservations: Iterable[Reservation],
          now: datetime, measured: Mapping[str, float] | None = None) -> ParallelismPlan:
    """The plan for one instance, or PlacementError. `measured`: node id -> the model's measured tok/s."""
    nodes = [n for n in nodes if not request.node_ids or n.node_id in request.node_ids]
    measured = measured or {}
    if not request.wants_gpu:
        plan = _place_cpu(nodes, measured)
        if request.node_ids and not plan.stages:  # named nodes, none of them ready: say so, not unplaced
            raise PlacementError(_no_fit_message(request, nodes))
        return plan
    reservations = list(reservations)
    gpu_tier = None if request.min_tier is Tier.CPU_ONLY else request.min_tier
    for tp, pp in candidate_sizes(request):
        per_gpu = math.ceil(request.vram_mb / (tp * pp))
        stages = _stages(nodes, per_gpu, tp, pp, gpu_tier, reservations, now, measured)
        if stages:
            return ParallelismPlan(Strategy.of(tp, pp), tp, pp, stages, per_gpu,
                                   memory_utilization(stages, nodes, per_gpu))
    raise PlacementError(_no_fit_message(request, nodes))


def candidate_sizes(request: PlacementRequest) -> list[tuple[int, int]]:
    """(tensor, pipeline) sizes to try, fewest GPUs first, then fewest stages."""
    tps = [request.tensor_parallel_size] if request.tensor_parallel_size else TENSOR_PARALLEL_SIZES
    pps = [request.pipeline_parallel_size] if request.pipeline_parallel_size else range(1, MAX_PIPELINE_STAGES + 1)
    return sorted(((tp, pp) for tp in tps for pp in pps), key=lambda size: (size[0] * size[1], size[1]))


def _stages(nodes: Sequence[NodeView], per_gpu: int, tp: int, pp: int, tier: Tier | None,
            reservations: list[Reservation], now: datetime, measured: Mapping[str, float]) -> tuple[Stage, ...]:
    """Stages for a (tp, pp) plan: all on one node when it has tp*pp fitting GPUs, else one node per stage."""
    one_node = by_measurement(can_fit(nodes, per_gpu, tp * pp, tier, reservations, now), measured)
    if one_node:
        gpus = one_node[0].chosen
        return tuple(Stage(one_node[0].node_id, tuple(sorted(gpus[i * tp:(i + 1) * tp]))) for i in range(pp))
    if pp == 1:
        return ()
    per_node = by_measurement(can_fit(nodes, per_gpu, tp, tier, reservations, now), measured)
    if len(per_node) < pp:
        return ()
    return tuple(Stage(fit.node_id, tuple(sorted(fit.chosen))) for fit in per_node[:pp])


def memory_utilization(stages: Sequence[Stage], nodes: Sequence[NodeView], per_gpu_mb: int) -> float:
    """vLLM's --gpu-memory-utilization: the share of each GPU's total memory it may take.

    As much as the least free chosen GPU allows (room for the KV cache), never more than
    the usual 0.90, never less than the model needs.
    """
    gpus = {(n.node_id, g.index): g for n in nodes for g in n.gpus}
    shares = []
    for stage in stages:
        for index in stage.gpus:
            gpu = gpus[(stage.node_id, index)]
            shares.append(gpu.memory_free_mb / gpu.memory_total_mb if gpu.memory_total_mb else 0.0)
            need = per_gpu_mb / gpu.memory_total_mb if gpu.memory_total_mb else 1.0
            shares[-1] = max(shares[-1], need)
    utilization = math.floor(min(shares, default=DEFAULT_GPU_MEMORY_UTILIZATION) * 100) / 100
    return max(MIN_GPU_MEMORY_UTILIZATION, min(DEFAULT_GPU_MEMORY_UTILIZATION, utilization))


def by_measurement(fits: list[NodeFit], measured: Mapping[str, float]) -> list[NodeFit]:
    """Measured nodes first, fastest first; the rest keep their order (sorted() is stable)."""
    return sorted(fits, key=lambda fit: -measured[fit.node_id] if fit.node_id in measured else 0.0)


def _place_cpu(nodes: Sequence[NodeView], measured: Mapping[str, float]) -> ParallelismPlan:
    """A CPU instance goes to the fastest measured ready node, else the least capable one (keep
    GPUs for GPU work), or stays unplaced so that any worker serving the model adopts it."""
    ready = sorted((n for n in nodes if n.state.takes_work),
                   key=lambda n: (n.node_id not in measured, -measured.get(n.node_id, 0.0), -n.tier.rank, n.node_id))
    stages = (Stage(ready[0].node_id, ()),) if ready else ()
    return ParallelismPlan(Strategy.CPU, stages=stages, gpu_memory_utilization=0.0)


def _no_fit_message(request: PlacementRequest, nodes: Sequence[NodeView]) -> str:
    ready = [n for n in nodes if n.state.takes_work]
    if not ready:
        return "no ready node to place the instance on"
    free = max((g.memory_free_mb for n in ready for g in n.gpus), default=0)
    sizes = ""
    if request.tensor_parallel_size or request.pipeline_parallel_size:
        sizes = (f" with tensor_parallel_size={request.tensor_parallel_size or 'any'}, "
                 f"pipeline_parallel_size={request.pipeline_parallel_size or 'any'}")
    gpus = "no GPUs" if request.min_tier is Tier.CPU_ONLY else f"no GPUs of tier {request.min_tier.value} or better"
    return (f"{gpus} can hold {request.vram_mb} MB{sizes} "
            f"(largest free GPU: {free} MB across {len(ready)} ready nodes)")


def pending_reservations(instances: Iterable[dict], until: datetime) -> list[Reservation]:
    """VRAM promised to instances that are placed but not running yet: their memory does not show
    in the nodes' free VRAM until the server starts, so a second placement must not take it."""
    out = []
    for instance in instances:
        if instance["state"] not in ("pending", "downloading", "starting"):
            continue
        plan = ParallelismPlan.from_dict(instance.get("plan") or {})
        for stage in plan.stages:
            out.extend(Reservation(str(instance["id"]), stage.node_id, gpu, plan.per_gpu_mb, until)
                       for gpu in stage.gpus)
    return out
