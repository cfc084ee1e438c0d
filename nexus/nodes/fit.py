"""Can-fit: which nodes and GPUs could take a job needing `gpu_count` GPUs of `required_mb` each.

Pure: the master reads nodes (from their last heartbeat) and unexpired
reservations from the database and asks this function. Available VRAM is the
GPU's free VRAM minus the VRAM reserved on it by reservations that have not
expired at `now`. Only nodes that take work (ready) are candidates; the GPU
must be of the requested tier or a more capable one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from nexus.nodes.states import NodeState
from nexus.queueing.tiers import Tier


@dataclass(frozen=True)
class GpuView:
    index: int
    tier: Tier
    memory_total_mb: int
    memory_free_mb: int


@dataclass(frozen=True)
class NodeView:
    node_id: str
    state: NodeState
    tier: Tier
    gpus: tuple[GpuView, ...]


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    node_id: str
    gpu_index: int
    memory_mb: int
    expires_at: datetime


@dataclass(frozen=True)
class GpuFit:
    index: int
    tier: Tier
    available_mb: int  # free minus live reservations


@dataclass(frozen=True)
class NodeFit:
    node_id: str
    tier: Tier
    gpus: tuple[GpuFit, ...]  # every GPU that fits, most available first
    chosen: tuple[int, ...]  # the gpu_count indexes placement would take

    def to_dict(self) -> dict:
        return {
            "node_id": self.node_id,
            "tier": self.tier.value,
            "gpus": [{"index": g.index, "tier": g.tier.value, "available_mb": g.available_mb} for g in self.gpus],
            "chosen": list(self.chosen),
        }


def can_fit(
    nodes: Iterable[NodeView],
    required_mb: int,
    gpu_count: int,
    tier: Tier | None,
    reservations: Iterable[Reservation],
    now: datetime,
) -> list[NodeFit]:
    """Nodes that could take the job, least capable tier first (keep the big GPUs for big jobs),
    then the most available VRAM."""
    if gpu_count < 1:
        raise ValueError("gpu_count must be at least 1")
    if required_mb < 0:
        raise ValueError("required_mb must not be negative")
    reserved = reserved_mb(reservations, now)
    fits = []
    for node in nodes:
        fit = _fit_node(node, required_mb, gpu_count, tier, reserved) if node.state.takes_work else None
        if fit is not None:
            fits.append(fit)
    return sorted(fits, key=lambda fit: (-fit.tier.rank, -sum(g.available_mb for g in fit.gpus), fit.node_id))


def reserved_mb(reservations: Iterable[Reservation], now: datetime) -> dict[tuple[str, int], int]:
    """(node_id, gpu_index) -> MB held by reservations still alive at `now`."""
    totals: dict[tuple[str, int], int] = defaultdict(int)
    for reservation in reservations:
        if reservation.expires_at > now:
            totals[(reservation.node_id, reservation.gpu_index)] += reservation.memory_mb
    return dict(totals)


def _fit_node(
    node: NodeView, required_mb: int, gpu_count: int, tier: Tier | None, reserved: dict[tuple[str, int], int]
) -> NodeFit | None:
    fitting = sorted(
        (
            GpuFit(gpu.index, gpu.tier, gpu.memory_free_mb - reserved.get((node.node_id, gpu.index), 0))
            for gpu in node.gpus
            if _tier_ok(gpu.tier, tier)
        ),
        key=lambda gpu: (-gpu.available_mb, gpu.index),
    )
    fitting = [gpu for gpu in fitting if gpu.available_mb >= required_mb]
    if len(fitting) < gpu_count:
        return None
    return NodeFit(node.node_id, node.tier, tuple(fitting), tuple(gpu.index for gpu in fitting[:gpu_count]))


def _tier_ok(gpu_tier: Tier, wanted: Tier | None) -> bool:
    if gpu_tier is Tier.CPU_ONLY:
        return False  # a GPU too small or too old to run GPU work
    return wanted is None or gpu_tier.rank <= wanted.rank
