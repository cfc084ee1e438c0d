"""A whole proof in this process: split, prove each segment, join. No cluster.

For `nexus prove --local`, the offline tests and the single-process baseline:
the receipt is the same as the cluster's when one node proves every segment.
"""

from __future__ import annotations

from typing import Any, Callable

from nexus.proofs.base import ProofRequest, SegmentResult
from nexus.proofs.registry import get_kind


def prove_locally(request: ProofRequest, node: str,
                  on_segment: Callable[[SegmentResult, int], None] | None = None) -> dict[str, Any]:
    """The receipt of `request` proven entirely by `node`; `on_segment(result, total)` after each segment."""
    kind = get_kind(request.kind)
    segments = kind.split(request)
    results = []
    for segment in segments:
        results.append(kind.prove(segment, node))
        if on_segment is not None:
            on_segment(results[-1], len(segments))
    return kind.join(request, results)
