"""Node tiers and the queue each one consumes.

Tiers are ordered from most to least capable. A worker consumes its own tier's
queue and, when allowed, the queues of the tiers below it (a 4090 can run a job
that only needs a 3060, never the other way round).
"""

from __future__ import annotations

from enum import Enum


class Tier(str, Enum):
    AI_FACTORY = "ai_factory"  # H100/H200/A100-class data-centre GPUs
    GPU_PEER = "gpu_peer"  # 4090/3090-class, 24 GB consumer GPUs
    GPU_INFRA = "gpu_infra"  # 4070/3060-class, 8-16 GB GPUs
    CPU_ONLY = "cpu_only"  # no usable GPU

    @property
    def rank(self) -> int:
        """0 for the most capable tier."""
        return TIER_ORDER.index(self)

    @property
    def queue(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str) -> "Tier":
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown tier {value!r}; expected one of {[t.value for t in cls]}") from None


TIER_ORDER: tuple[Tier, ...] = (Tier.AI_FACTORY, Tier.GPU_PEER, Tier.GPU_INFRA, Tier.CPU_ONLY)


def tiers_at_or_below(tier: Tier) -> tuple[Tier, ...]:
    return TIER_ORDER[tier.rank:]


def queues_for_worker(tier: Tier, take_lower_tiers: bool) -> list[str]:
    """The tier queues a worker of `tier` consumes, its own first."""
    tiers = tiers_at_or_below(tier) if take_lower_tiers else (tier,)
    return [t.queue for t in tiers]
