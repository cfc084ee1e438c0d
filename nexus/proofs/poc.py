"""The built-in proof kind `poc`: proof-of-compute in the spirit of Gonka's PoC.

For nonce n proven by node N under seed S:
  inputs      seq_len x dim standard normals from seed(f"{S}_{N}_nonce{n}")
  permutation of the vocabulary from seed(f"{S}_{N}_nonce{n}_permutation")
  target      a unit vector in R^vocab from seed(f"{S}_target")
  distance    || normalise(permute(last-token logits of the seeded model)) - target ||
Nonces whose distance is below r_target are the proof; each node's count of
them is its proven weight.

Choosing r_target. The permutation scatters the logits over the target's
coordinates, so the cosine c between the permuted, normalised logits and the
target behaves like that of a random direction: about N(0, 1/vocab). Since
distance^2 = 2 - 2c, a pass fraction q needs
    r_target = sqrt(2 - 2 z / sqrt(vocab)),  z = Phi^-1(1 - q).
Each preset fixes q and records the r_target this gives; a unit test measures
the observed fraction on real nonces.

The torch compute lives in nexus.proofs.compute, imported only when proving or
verifying, so the API validates requests without torch installed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from nexus.proofs.base import BatchHook, ProofRequest, Segment, SegmentResult, ValidNonce, Verdict
from nexus.proofs.receipts import check_integrity, join_results, split_range
from nexus.proofs.shapes import ModelShape
from nexus.proofs.verify import DEFAULT_POLICY, check_verification_parameters, sampled_verdict

KIND_NAME = "poc"

# Honest recomputation in float32 on other hardware drifts by ~1e-6; a prover
# cutting corners (bf16, skipped layers) lands orders of magnitude further off.
# With a tolerance 100x the drift an honest receipt essentially never fails a
# nonce, so the tolerated rate is small: at 0.0005 a single failure among up to
# 64 sampled nonces gives p <= 0.032 < significance, i.e. one fabricated or
# edited nonce that is sampled rejects the receipt.
DEFAULT_VERIFICATION: dict[str, Any] = {
    "sample_size": 64,
    "tolerated_failure_rate": 0.0005,
    "significance": 0.05,
    "distance_tolerance": 1e-4,
}


def r_target_for(pass_fraction: float, vocab_size: int) -> float:
    """The radius that lets about `pass_fraction` of nonces through (see module docstring)."""
    z = NormalDist().inv_cdf(1.0 - pass_fraction)
    return round(math.sqrt(2.0 - 2.0 * z / math.sqrt(vocab_size)), 6)


@dataclass(frozen=True)
class Preset:
    name: str
    shape: ModelShape
    pass_fraction: float
    segment_size: int  # default nonces per segment: about a minute of work on the intended device
    batch_cpu: int
    batch_gpu: int

    @property
    def parameters(self) -> dict[str, Any]:
        """Everything that fixes the distances, as recorded in (and checked against) receipts."""
        return {
            "preset": self.name,
            **{name: getattr(self.shape, name) for name in ModelShape.__dataclass_fields__},
            "target_pass_fraction": self.pass_fraction,
            "r_target": r_target_for(self.pass_fraction, self.shape.vocab_size),
        }

    def batch_size(self, device_type: str) -> int:
        return self.batch_gpu if device_type == "cuda" else self.batch_cpu


PRESETS: dict[str, Preset] = {
    # Seconds on one CPU core: for tests and laptops.
    "tiny": Preset(
        "tiny",
        ModelShape(dim=64, n_layers=2, n_heads=4, ffn_dim=176, vocab_size=1024, seq_len=16,
                   pool_size=1 << 16, weight_std=0.02, rope_theta=10000.0, norm_eps=1e-5),
        pass_fraction=0.1, segment_size=256, batch_cpu=256, batch_gpu=4096,
    ),
    # ~100 M parameters, ~6.6 GFLOP per nonce: sized for a data-centre or consumer GPU.
    "standard": Preset(
        "standard",
        ModelShape(dim=1024, n_layers=8, n_heads=16, ffn_dim=2816, vocab_size=8192, seq_len=32,
                   pool_size=1 << 22, weight_std=0.02, rope_theta=10000.0, norm_eps=1e-5),
        pass_fraction=0.01, segment_size=32768, batch_cpu=16, batch_gpu=512,
    ),
}
DEFAULT_PRESET = "standard"


def preset_of(parameters: dict[str, Any]) -> Preset:
    name = parameters.get("preset")
    if name not in PRESETS:
        raise ValueError(f"unknown poc preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


class PocKind:
    """The four steps for `poc`; split and join are the shared range logic."""

    name = KIND_NAME

    def resolve(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
        unknown = set(options) - {"preset", "verification"}
        if unknown:
            raise ValueError(f"unknown poc options: {', '.join(sorted(unknown))}; allowed: preset, verification")
        name = options.get("preset", DEFAULT_PRESET)
        if name not in PRESETS:
            raise ValueError(f"unknown poc preset {name!r}; expected one of {sorted(PRESETS)}")
        overrides = options.get("verification") or {}
        if not isinstance(overrides, dict) or set(overrides) - set(DEFAULT_VERIFICATION):
            raise ValueError(f"verification must be an object with keys among {sorted(DEFAULT_VERIFICATION)}")
        verification = {**DEFAULT_VERIFICATION, **overrides}
        problems = check_verification_parameters(verification, DEFAULT_POLICY)
        if problems:
            raise ValueError("verification parameters rejected: " + "; ".join(problems))
        preset = PRESETS[name]
        return preset.parameters, verification, preset.segment_size

    def split(self, request: ProofRequest) -> list[Segment]:
        return split_range(request)

    def prove(self, segment: Segment, node: str, on_batch: BatchHook | None = None) -> SegmentResult:
        from nexus.proofs.compute import describe_device, distances, pick_device  # torch: workers only

        device = pick_device()
        started = time.perf_counter()
        nonces = list(range(segment.nonce_start, segment.nonce_end))
        found = distances(segment.seed, segment.parameters, node, nonces, device, on_batch=on_batch)
        r_target = segment.parameters["r_target"]
        valid = tuple(ValidNonce(n, float(d)) for n, d in zip(nonces, found) if d < r_target)
        return SegmentResult(segment, node, valid, describe_device(device), round(time.perf_counter() - started, 6))

    def join(self, request: ProofRequest, results: list[SegmentResult]) -> dict[str, Any]:
        return join_results(request, results)

    def verify(self, receipt: dict[str, Any], salt: str = "") -> Verdict:
        kind, digest = str(receipt.get("kind", "")), str(receipt.get("receipt_digest", ""))
        reasons = check_integrity(receipt) or self._check_claims(receipt)
        if reasons:
            return Verdict.rejected(kind, digest, *reasons)
        return sampled_verdict(receipt, salt, lambda entries: self._recompute(receipt, entries))

    def _check_claims(self, receipt: dict[str, Any]) -> list[str]:
        if receipt["kind"] != KIND_NAME:
            return [f"receipt kind {receipt['kind']!r} is not {KIND_NAME!r}"]
        try:
            expected = preset_of(receipt["parameters"]).parameters
        except ValueError as unknown:
            return [str(unknown)]
        changed = sorted(k for k in expected.keys() | receipt["parameters"].keys()
                         if receipt["parameters"].get(k) != expected.get(k))
        if changed:
            return [f"parameters differ from preset {expected['preset']!r}: {', '.join(changed)}"]
        reasons = check_verification_parameters(receipt["verification"], DEFAULT_POLICY)
        over = [e["nonce"] for e in receipt["valid"] if not e["distance"] < expected["r_target"]]
        if over:
            reasons.append(f"nonces claimed valid with distance >= r_target: {over[:10]}")
        return reasons

    def _recompute(self, receipt: dict[str, Any], entries: list[dict[str, Any]]) -> list[float]:
        from nexus.proofs.compute import distances  # torch: only where verification runs

        recomputed: dict[tuple[str, int], float] = {}
        nodes = sorted({e["node"] for e in entries})
        for node in nodes:
            nonces = [e["nonce"] for e in entries if e["node"] == node]
            for nonce, d in zip(nonces, distances(receipt["seed"], receipt["parameters"], node, nonces)):
                recomputed[(node, nonce)] = float(d)
        return [recomputed[(e["node"], e["nonce"])] for e in entries]
