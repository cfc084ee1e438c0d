"""Kind-independent steps: split a nonce range, join segment results into a
receipt, and check a receipt's structure, digests and Merkle root.

A receipt is untrusted input (anyone may hand one over), so the checks here
never assume a field exists or has the right type.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from nexus.proofs.base import RECEIPT_FORMAT, ProofRequest, Segment, SegmentResult, ValidNonce, segment_digest
from nexus.proofs.digests import digest_of, is_hex_digest, merkle_root


def split_range(request: ProofRequest) -> list[Segment]:
    """Consecutive segments of `segment_size` nonces; the last one may be shorter."""
    segments = []
    for index, start in enumerate(range(request.nonce_start, request.nonce_end, request.segment_size)):
        end = min(start + request.segment_size, request.nonce_end)
        segments.append(Segment(request.kind, request.seed, request.parameters, index, start, end))
    return segments


def join_results(request: ProofRequest, results: list[SegmentResult]) -> dict[str, Any]:
    """Merge every segment's result into a receipt; refuses a missing, extra or foreign segment."""
    expected = split_range(request)
    by_index = {r.segment.index: r for r in results}
    if len(by_index) != len(results) or sorted(by_index) != list(range(len(expected))):
        raise ValueError(f"join needs exactly one result per segment 0..{len(expected) - 1}, got indexes {sorted(by_index)}")
    for segment in expected:
        if by_index[segment.index].segment != segment:
            raise ValueError(f"segment {segment.index}: result is for a different segment (range, seed or parameters)")
    ordered = [by_index[s.index] for s in expected]
    valid = sorted(
        ({"nonce": v.nonce, "node": r.node, "distance": v.distance} for r in ordered for v in r.valid),
        key=lambda entry: entry["nonce"],
    )
    receipt: dict[str, Any] = {
        "format": RECEIPT_FORMAT,
        "kind": request.kind,
        "parameters": request.parameters,
        "seed": request.seed,
        "nonce_range": [request.nonce_start, request.nonce_end],
        "segment_size": request.segment_size,
        "segments": [_segment_entry(r) for r in ordered],
        "valid": valid,
        "valid_count": len(valid),
        "node_counts": dict(sorted(Counter(entry["node"] for entry in valid).items())),
        "merkle_root": merkle_root([r.digest for r in ordered]),
        "verification": request.verification,
    }
    receipt["receipt_digest"] = receipt_digest(receipt)
    return receipt


def _segment_entry(result: SegmentResult) -> dict[str, Any]:
    return {
        "index": result.segment.index,
        "nonce_start": result.segment.nonce_start,
        "nonce_end": result.segment.nonce_end,
        "node": result.node,
        "valid_count": len(result.valid),
        "digest": result.digest,
        "device": result.device,
        "elapsed_seconds": result.elapsed_seconds,
    }


def receipt_digest(receipt: dict[str, Any]) -> str:
    """Digest over everything but the digest field itself."""
    return digest_of({k: v for k, v in receipt.items() if k != "receipt_digest"})


def reseal(receipt: dict[str, Any]) -> dict[str, Any]:
    """Recompute every digest of an edited receipt (what a careful forger does).
    Verification must then catch the edit by recomputing distances; tests use this."""
    sealed = dict(receipt)
    entries_by_segment = _entries_by_segment(sealed)
    segments = []
    for seg in sealed["segments"]:
        valid = [ValidNonce(e["nonce"], e["distance"]) for e in entries_by_segment.get(seg["index"], [])]
        segment = Segment(sealed["kind"], sealed["seed"], sealed["parameters"], seg["index"],
                          seg["nonce_start"], seg["nonce_end"])
        segments.append({**seg, "valid_count": len(valid), "digest": segment_digest(segment, seg["node"], valid)})
    sealed["segments"] = segments
    sealed["valid_count"] = len(sealed["valid"])
    sealed["node_counts"] = dict(sorted(Counter(e["node"] for e in sealed["valid"]).items()))
    sealed["merkle_root"] = merkle_root([s["digest"] for s in segments])
    sealed["receipt_digest"] = receipt_digest(sealed)
    return sealed


def check_integrity(receipt: Any) -> list[str]:
    """Reasons the receipt is malformed or its digests do not add up; empty when sound."""
    reasons = _check_shape(receipt)
    if reasons:
        return reasons
    reasons += _check_segments(receipt)
    if reasons:
        return reasons
    reasons += _check_valid_entries(receipt)
    if reasons:
        return reasons
    reasons += _check_digests(receipt)
    return reasons


_TOP_LEVEL_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "kind": str, "parameters": dict, "seed": str, "nonce_range": list, "segment_size": int,
    "segments": list, "valid": list, "valid_count": int, "node_counts": dict, "merkle_root": str,
    "verification": dict, "receipt_digest": str,
}


def _check_shape(receipt: Any) -> list[str]:
    if not isinstance(receipt, dict):
        return ["receipt is not a JSON object"]
    missing = [k for k in _TOP_LEVEL_TYPES if k not in receipt]
    if missing:
        return [f"receipt lacks fields: {', '.join(missing)}"]
    wrong = [k for k, t in _TOP_LEVEL_TYPES.items() if not isinstance(receipt[k], t) or isinstance(receipt[k], bool)]
    if wrong:
        return [f"receipt fields have the wrong type: {', '.join(wrong)}"]
    if receipt["format"] != RECEIPT_FORMAT:
        return [f"unknown receipt format {receipt['format']!r}; expected {RECEIPT_FORMAT!r}"]
    start_end = receipt["nonce_range"]
    if len(start_end) != 2 or not all(_is_int(v) for v in start_end) or not 0 <= start_end[0] < start_end[1]:
        return ["nonce_range must be [start, end] with 0 <= start < end"]
    return []


def _check_segments(receipt: dict[str, Any]) -> list[str]:
    expected_start = receipt["nonce_range"][0]
    for position, seg in enumerate(receipt["segments"]):
        if not isinstance(seg, dict) or not all(_is_int(seg.get(k)) for k in ("index", "nonce_start", "nonce_end")):
            return [f"segment {position} is malformed"]
        if not isinstance(seg.get("node"), str) or not is_hex_digest(seg.get("digest")):
            return [f"segment {position} lacks a node name or a digest"]
        if seg["index"] != position or seg["nonce_start"] != expected_start or seg["nonce_end"] <= seg["nonce_start"]:
            return [f"segment {position} does not continue the nonce range (segments must tile it in order)"]
        expected_start = seg["nonce_end"]
    if expected_start != receipt["nonce_range"][1] or not receipt["segments"]:
        return ["segments do not cover the receipt's nonce range"]
    return []


def _check_valid_entries(receipt: dict[str, Any]) -> list[str]:
    segments = receipt["segments"]
    previous = -1
    for entry in receipt["valid"]:
        if not isinstance(entry, dict) or not _is_int(entry.get("nonce")) or not isinstance(entry.get("node"), str):
            return [f"valid entry {entry!r} is malformed"]
        distance = entry.get("distance")
        if not isinstance(distance, (int, float)) or isinstance(distance, bool) or not math.isfinite(distance):
            return [f"nonce {entry['nonce']}: distance is not a finite number"]
        if entry["nonce"] <= previous:
            return [f"nonce {entry['nonce']}: valid nonces must be listed once each, in increasing order"]
        previous = entry["nonce"]
        segment = _segment_holding(segments, entry["nonce"])
        if segment is None:
            return [f"nonce {entry['nonce']} lies outside the receipt's nonce range"]
        if segment["node"] != entry["node"]:
            return [f"nonce {entry['nonce']}: node {entry['node']!r} did not prove segment {segment['index']}"]
    return []


def _check_digests(receipt: dict[str, Any]) -> list[str]:
    reasons = []
    entries_by_segment = _entries_by_segment(receipt)
    for seg in receipt["segments"]:
        valid = [ValidNonce(e["nonce"], e["distance"]) for e in entries_by_segment.get(seg["index"], [])]
        segment = Segment(receipt["kind"], receipt["seed"], receipt["parameters"], seg["index"],
                          seg["nonce_start"], seg["nonce_end"])
        if segment_digest(segment, seg["node"], valid) != seg["digest"]:
            reasons.append(f"segment {seg['index']}: digest does not match the receipt's nonces, seed or parameters")
        if seg.get("valid_count") != len(valid):
            reasons.append(f"segment {seg['index']}: valid_count does not match its valid nonces")
    if merkle_root([s["digest"] for s in receipt["segments"]]) != receipt["merkle_root"]:
        reasons.append("Merkle root does not match the segment digests")
    if receipt["valid_count"] != len(receipt["valid"]):
        reasons.append("valid_count does not match the number of valid nonces")
    counts = Counter(e["node"] for e in receipt["valid"])
    if receipt["node_counts"] != dict(counts):
        reasons.append("node_counts do not match the valid nonces")
    if receipt_digest(receipt) != receipt["receipt_digest"]:
        reasons.append("receipt_digest does not match the receipt's content")
    return reasons


def _entries_by_segment(receipt: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for entry in receipt["valid"]:
        segment = _segment_holding(receipt["segments"], entry["nonce"])
        if segment is not None:
            grouped.setdefault(segment["index"], []).append(entry)
    return grouped


def _segment_holding(segments: list[dict[str, Any]], nonce: int) -> dict[str, Any] | None:
    # Segments tile the range in order (checked before this is used), so bisect.
    lo, hi = 0, len(segments)
    while lo < hi:
        mid = (lo + hi) // 2
        if nonce < segments[mid]["nonce_start"]:
            hi = mid
        elif nonce >= segments[mid]["nonce_end"]:
            lo = mid + 1
        else:
            return segments[mid]
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
