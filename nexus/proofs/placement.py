"""Where a proof's segments run: a pure function of the request (docs/ARCHITECTURE.md, "Queues carry routing").

GPU tiers are preferred: by default a segment asks for a GPU, so it goes to the
least capable GPU tier's queue, which every GPU worker that takes lower tiers
also drains. `allow_cpu` lets it run anywhere: the segment goes to the
`cpu_only` queue, consumed by CPU workers and by GPU workers configured to take
lower tiers (NEXUS_WORKER_TAKE_LOWER_TIERS), so idle GPUs still pick segments
up. `tier` pins every segment to one tier's queue.
"""

from __future__ import annotations



def segment_requirements(allow_cpu: bool, tier: str | None) -> dict:
    """The `requirements` of each segment job of a proof (and, through the proofs
    API, of the proof job itself, so that it waits where it can help)."""
    if tier is not None:
        return {"tier": tier}
    if allow_cpu:
        return {}
    return {"gpu": True}
