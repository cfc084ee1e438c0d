"""Tiering and queue selection: pure functions over `NodeHardware`.

A GPU's tier comes from its total VRAM and its class (the tokens of its NVML
name): AI_FACTORY needs data-centre VRAM *and* a data-centre class, so a 48 GB
workstation card is a GPU_PEER, not an H100 peer. GPUs older than the minimum
compute capability are ignored, as vLLM and our kernels cannot use them.

A node's tier is its best GPU's. Each usable GPU gets one worker that consumes
its own GPU's tier queue (a 4090 + 3060 box runs a gpu_peer and a gpu_infra
worker); a node with no usable GPU runs one CPU worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from nexus.nodes.hardware import GpuInfo, NodeHardware, parse_compute_capability
from nexus.config import Settings
from nexus.queueing.tiers import Tier, queues_for_worker


@dataclass(frozen=True)
class TierThresholds:
    ai_factory_min_vram_mb: int
    ai_factory_classes: frozenset[str]  # upper-case name tokens, e.g. "H100"
    gpu_peer_min_vram_mb: int
    gpu_infra_min_vram_mb: int
    min_compute_capability: tuple[int, int]

    @classmethod
    def from_settings(cls, settings: Settings) -> "TierThresholds":
        return cls(
            ai_factory_min_vram_mb=settings.tier_ai_factory_min_vram_mb,
            ai_factory_classes=frozenset(
                token.strip().upper() for token in settings.tier_ai_factory_gpu_classes.split(",") if token.strip()
            ),
            gpu_peer_min_vram_mb=settings.tier_gpu_peer_min_vram_mb,
            gpu_infra_min_vram_mb=settings.tier_gpu_infra_min_vram_mb,
            min_compute_capability=parse_compute_capability(settings.tier_min_compute_capability),
        )


@dataclass(frozen=True)
class WorkerPlan:
    """One Celery worker the agent runs: on one GPU, or on the CPU when gpu_index is None."""

    gpu_index: int | None
    tier: Tier
    queues: tuple[str, ...]

    @property
    def name(self) -> str:
        return "cpu" if self.gpu_index is None else f"gpu{self.gpu_index}"


def gpu_class_tokens(name: str) -> frozenset[str]:
    """ "NVIDIA A100-SXM4-80GB" -> {"NVIDIA", "A100", "SXM4", "80GB"}. Whole tokens, so "RTX A1000" is not an A100."""
    return frozenset(token for token in re.split(r"[^A-Z0-9]+", name.upper()) if token)


def classify_gpu(gpu: GpuInfo, thresholds: TierThresholds) -> Tier:
    if gpu.compute_capability_tuple < thresholds.min_compute_capability:
        return Tier.CPU_ONLY
    vram = gpu.memory_total_mb
    is_data_centre_class = bool(gpu_class_tokens(gpu.name) & thresholds.ai_factory_classes)
    if vram >= thresholds.ai_factory_min_vram_mb and is_data_centre_class:
        return Tier.AI_FACTORY
    if vram >= thresholds.gpu_peer_min_vram_mb:
        return Tier.GPU_PEER
    if vram >= thresholds.gpu_infra_min_vram_mb:
        return Tier.GPU_INFRA
    return Tier.CPU_ONLY  # too small to be worth a GPU worker


def gpu_tiers(hardware: NodeHardware, thresholds: TierThresholds) -> dict[int, Tier]:
    """GPU index -> tier, for every GPU (unusable ones are CPU_ONLY)."""
    return {gpu.index: classify_gpu(gpu, thresholds) for gpu in hardware.gpus}


def classify_node(hardware: NodeHardware, thresholds: TierThresholds) -> Tier:
    return best_tier(gpu_tiers(hardware, thresholds).values())


def best_tier(tiers: Iterable[Tier]) -> Tier:
    return min(tiers, key=lambda tier: tier.rank, default=Tier.CPU_ONLY)


def plan_workers(
    hardware: NodeHardware,
    thresholds: TierThresholds,
    take_lower_tiers: bool,
    extra_queues: Sequence[str] = (),
) -> list[WorkerPlan]:
    """The workers this node runs and the queues each consumes, own tier first.

    `extra_queues` (model queues for inference) are added to every worker.
    """
    usable = {index: tier for index, tier in gpu_tiers(hardware, thresholds).items() if tier is not Tier.CPU_ONLY}
    if not usable:
        return [WorkerPlan(None, Tier.CPU_ONLY, _queues(Tier.CPU_ONLY, take_lower_tiers, extra_queues))]
    return [
        WorkerPlan(index, tier, _queues(tier, take_lower_tiers, extra_queues))
        for index, tier in sorted(usable.items())
    ]


def _queues(tier: Tier, take_lower_tiers: bool, extra_queues: Sequence[str]) -> tuple[str, ...]:
    queues = queues_for_worker(tier, take_lower_tiers)
    return tuple(queues + [queue for queue in extra_queues if queue not in queues])

