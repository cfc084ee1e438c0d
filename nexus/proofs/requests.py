"""Validation of proof requests: what a client may ask for, with limits.

`validate_proof_request` turns a submitted payload into the normalised payload
the proof job runs from (kind parameters resolved, seed drawn when absent, so
the stored job records exactly what was proven). Every refusal is a ValueError
whose message the API returns as a 400.

A request: {"kind", "seed"?, "nonce_start"?, "nonce_end", "segment_size"?,
"allow_cpu"?, "tier"?, "options"?}; `options` belong to the kind (for `poc`:
"preset" and "verification").
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from nexus.proofs.base import ProofRequest
from nexus.proofs.registry import get_kind
from nexus.queueing.tiers import Tier

MAX_NONCE = 2**53 - 1  # JSON numbers stay exact up to here in every client
MAX_NONCES_PER_REQUEST = 100_000_000
MAX_SEGMENTS = 10_000  # each segment is one child job
MIN_SEGMENT_SIZE = 1
MAX_SEGMENT_SIZE = 10_000_000
MAX_SEED_LENGTH = 128

REQUEST_FIELDS = ("kind", "seed", "nonce_start", "nonce_end", "segment_size", "allow_cpu", "tier", "options")


def validate_proof_request(payload: Any, draw_seed: Callable[[], str] = lambda: secrets.token_hex(16)) -> dict[str, Any]:
    """The normalised request as a dict (ProofRequest.to_dict()); raises ValueError."""
    return parse_proof_request(payload, draw_seed).to_dict()


def parse_proof_request(payload: Any, draw_seed: Callable[[], str] = lambda: secrets.token_hex(16)) -> ProofRequest:
    if not isinstance(payload, dict):
        raise ValueError("a proof request must be a JSON object")
    unknown = set(payload) - set(REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"unknown proof request fields: {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(REQUEST_FIELDS)} (kind-specific ones go in options)")
    kind = get_kind(_required_str(payload, "kind"))
    start, end = _nonce_range(payload)
    seed = payload.get("seed")
    seed = draw_seed() if seed is None else _seed(seed)
    options = payload.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError("options must be a JSON object")
    parameters, verification, default_segment_size = kind.resolve(options)
    segment_size = _segment_size(payload.get("segment_size", default_segment_size), end - start)
    allow_cpu = payload.get("allow_cpu", False)
    if not isinstance(allow_cpu, bool):
        raise ValueError("allow_cpu must be true or false")
    tier = _tier(payload.get("tier"), allow_cpu)
    return ProofRequest(kind.name, seed, start, end, segment_size, allow_cpu, parameters, verification, tier)


def _tier(value: Any, allow_cpu: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("tier must be a string")
    tier = Tier.parse(value)
    if tier is Tier.CPU_ONLY and not allow_cpu:
        raise ValueError("tier cpu_only proves on CPUs: set allow_cpu to true")
    return tier.value


def _required_str(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} is required and must be a non-empty string")
    return value


def _nonce_range(payload: dict[str, Any]) -> tuple[int, int]:
    start, end = payload.get("nonce_start", 0), payload.get("nonce_end")
    for name, value in (("nonce_start", start), ("nonce_end", end)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer")
    if not 0 <= start < end:
        raise ValueError(f"the nonce range must satisfy 0 <= nonce_start < nonce_end (got {start}..{end})")
    if end > MAX_NONCE:
        raise ValueError(f"nonce_end {end} exceeds the largest nonce {MAX_NONCE}")
    if end - start > MAX_NONCES_PER_REQUEST:
        raise ValueError(f"{end - start} nonces requested; one proof covers at most {MAX_NONCES_PER_REQUEST}")
    return start, end


def _seed(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SEED_LENGTH or not value.isprintable():
        raise ValueError(f"seed must be a printable string of 1 to {MAX_SEED_LENGTH} characters")
    return value


def _segment_size(value: Any, nonce_count: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("segment_size must be an integer")
    if not MIN_SEGMENT_SIZE <= value <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}")
    segments = -(-nonce_count // value)
    if segments > MAX_SEGMENTS:
        raise ValueError(f"{segments} segments of {value} nonces; at most {MAX_SEGMENTS} per proof: raise segment_size")
    return value
