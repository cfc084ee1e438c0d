"""Routing as one pure function: a job's requirements decide its queue.

A message only reaches a worker that can run it: tier queues for plain work,
one queue per model for inference (only workers serving that model consume it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nexus.config import Settings
from nexus.queueing.tiers import Tier

MODEL_QUEUE_PREFIX = "model."
# Every worker of a node also consumes its node's queue, so a job can be pinned to one node
# (a benchmark measures each node); a node's serving workers also consume node.<name>.model.<model>.
NODE_QUEUE_PREFIX = "node."
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # nexus.nodes.schemas.NAME_PATTERN

REQUIREMENT_FIELDS = {"tier", "gpu", "min_vram_mb", "model", "labels", "node"}


@dataclass(frozen=True)
class Requirements:
    tier: Tier | None = None
    gpu: bool = False
    min_vram_mb: int = 0
    model: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    node: str | None = None  # a node's name: only that node's workers take the job

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> "Requirements":
        """Validate a requirements object from a request; ValueError says what is wrong."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ValueError("requirements must be a JSON object")
        unknown = set(raw) - REQUIREMENT_FIELDS
        if unknown:
            raise ValueError(f"unknown requirement fields: {sorted(unknown)}; allowed: {sorted(REQUIREMENT_FIELDS)}")
        tier = Tier.parse(raw["tier"]) if raw.get("tier") is not None else None
        gpu = raw.get("gpu", False)
        if not isinstance(gpu, bool):
            raise ValueError("requirements.gpu must be true or false")
        vram = raw.get("min_vram_mb", 0)
        if not isinstance(vram, int) or isinstance(vram, bool) or not 0 <= vram <= 10_000_000:
            raise ValueError("requirements.min_vram_mb must be an integer between 0 and 10000000")
        model = raw.get("model")
        if model is not None and (not isinstance(model, str) or not _MODEL_NAME.match(model)):
            raise ValueError("requirements.model must be a model name (letters, digits, . _ : / -)")
        labels = raw.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("requirements.labels must be an object of strings")
        if tier is Tier.CPU_ONLY and (gpu or vram):
            raise ValueError("requirements ask for a GPU but tier cpu_only has none")
        node = raw.get("node")
        if node is not None and (not isinstance(node, str) or not _NODE_NAME.match(node)):
            raise ValueError("requirements.node must be a node's name (letters, digits, . _ -)")
        return cls(tier=tier, gpu=gpu, min_vram_mb=vram, model=model, labels=labels, node=node)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tier is not None:
            out["tier"] = self.tier.value
        if self.gpu:
            out["gpu"] = True
        if self.min_vram_mb:
            out["min_vram_mb"] = self.min_vram_mb
        if self.model:
            out["model"] = self.model
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.node:
            out["node"] = self.node
        return out


def vram_thresholds(settings: Settings) -> dict[Tier, int]:
    """Minimum VRAM a GPU of each tier has (NEXUS_TIER_*_MIN_VRAM_MB): the same numbers the nodes
    are tiered by (nexus.nodes.tiers), so a job goes to the tier whose GPUs can hold it."""
    return {Tier.AI_FACTORY: settings.tier_ai_factory_min_vram_mb, Tier.GPU_PEER: settings.tier_gpu_peer_min_vram_mb,
            Tier.GPU_INFRA: settings.tier_gpu_infra_min_vram_mb}


def tier_for_vram(min_vram_mb: int, thresholds: dict[Tier, int]) -> Tier:
    """The least capable GPU tier whose GPUs have at least `min_vram_mb`."""
    for tier in (Tier.GPU_INFRA, Tier.GPU_PEER, Tier.AI_FACTORY):
        next_up = {Tier.GPU_INFRA: Tier.GPU_PEER, Tier.GPU_PEER: Tier.AI_FACTORY}.get(tier)
        if next_up is None or min_vram_mb < thresholds[next_up]:
            return tier
    return Tier.AI_FACTORY


def route_for(req: Requirements, thresholds: dict[Tier, int]) -> str:
    """The queue a job with these requirements goes to; `thresholds` from `vram_thresholds(settings)`."""
    if req.node and req.model:
        return node_model_queue(req.node, req.model)
    if req.node:
        return node_queue(req.node)
    if req.model:
        return model_queue(req.model)
    if req.tier is not None:
        return req.tier.queue
    if req.gpu or req.min_vram_mb:
        return tier_for_vram(req.min_vram_mb, thresholds).queue
    return Tier.CPU_ONLY.queue


def model_queue(model: str) -> str:
    return MODEL_QUEUE_PREFIX + model


def node_queue(node_name: str) -> str:
    """Every worker an agent runs on the node consumes it."""
    return NODE_QUEUE_PREFIX + node_name


def node_model_queue(node_name: str, model: str) -> str:
    """The node's serving workers of `model` consume it: work for that model on that node."""
    return f"{NODE_QUEUE_PREFIX}{node_name}.{model_queue(model)}"


# Jobs only the master's own workers run (`nexus verifier`, with the master's credentials): the worker
# database role may not claim a job on such a queue (nexus.jobs.lifecycle), so no node records them.
MASTER_QUEUE_PREFIX = "master."


def master_queue(job_type: str) -> str:
    return MASTER_QUEUE_PREFIX + job_type
