"""Sampled verification: which nonces to recompute, and when to accept.

The sample is drawn from the receipt's own digest (plus an optional verifier
salt), so anyone re-running verification checks the same nonces; a verifier
who fears a prover ground the digest to dodge the sample passes a fresh salt.

The decision is a one-sided binomial test. H0: the receipt's true share of bad
nonces is at most `tolerated_failure_rate` (recomputation on other hardware may
drift past the distance tolerance now and then). Reject when P(X >= failures)
under H0 falls below `significance`.

The receipt carries its own verification parameters, and nothing stops a forger
from loosening them, so the verifier enforces bounds of its own (the policy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nexus.proofs.base import Verdict
from nexus.proofs.receipts import check_integrity
from nexus.proofs.seeds import rng

# Recomputes distances for receipt entries ({"nonce", "node", "distance"}), in order.
Recompute = Callable[[list[dict[str, Any]]], list[float]]


@dataclass(frozen=True)
class VerificationPolicy:
    """The loosest verification parameters this verifier accepts from a receipt."""

    min_sample_size: int = 16
    max_sample_size: int = 10_000
    max_tolerated_failure_rate: float = 0.05
    min_significance: float = 1e-4
    max_significance: float = 0.5
    max_distance_tolerance: float = 1e-3


DEFAULT_POLICY = VerificationPolicy()


def check_verification_parameters(verification: dict[str, Any], policy: VerificationPolicy = DEFAULT_POLICY) -> list[str]:
    """Reasons the parameters are missing or laxer than the policy allows; empty when fine."""
    try:
        sample_size = verification["sample_size"]
        rate = verification["tolerated_failure_rate"]
        significance = verification["significance"]
        tolerance = verification["distance_tolerance"]
    except KeyError as missing:
        return [f"verification parameters lack {missing.args[0]!r}"]
    if not isinstance(sample_size, int) or isinstance(sample_size, bool):
        return ["verification sample_size must be an integer"]
    numbers = (rate, significance, tolerance)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        return ["verification rates and tolerance must be finite numbers"]
    reasons = []
    if not policy.min_sample_size <= sample_size <= policy.max_sample_size:
        reasons.append(f"sample_size {sample_size} outside [{policy.min_sample_size}, {policy.max_sample_size}]")
    if not 0 <= rate <= policy.max_tolerated_failure_rate:
        reasons.append(f"tolerated_failure_rate {rate} outside [0, {policy.max_tolerated_failure_rate}]")
    if not policy.min_significance <= significance <= policy.max_significance:
        reasons.append(f"significance {significance} outside [{policy.min_significance}, {policy.max_significance}]")
    if not 0 < tolerance <= policy.max_distance_tolerance:
        reasons.append(f"distance_tolerance {tolerance} outside (0, {policy.max_distance_tolerance}]")
    return reasons


def sample_indices(receipt_digest: str, salt: str, population: int, size: int) -> list[int]:
    """A deterministic sample without replacement of min(size, population) indexes, sorted."""
    take = min(size, population)
    if take == 0:
        return []
    chosen = rng(f"{receipt_digest}_{salt}_verification_sample").choice(population, size=take, replace=False)
    return sorted(int(i) for i in chosen)


def binomial_p_value(failures: int, trials: int, tolerated_rate: float) -> float:
    """P(X >= failures) for X ~ Binomial(trials, tolerated_rate)."""
    if trials == 0 or failures == 0:
        return 1.0
    from scipy.stats import binomtest  # scipy comes with the cpu/gpu extras, where verification runs

    return float(binomtest(failures, trials, tolerated_rate, alternative="greater").pvalue)


def sampled_verdict(receipt: dict[str, Any], salt: str, recompute: Recompute) -> Verdict:
    """Recompute a sample of the receipt's valid nonces and apply the binomial test.
    The receipt must already have passed the integrity and parameter checks."""
    verification = receipt["verification"]
    entries = receipt["valid"]
    picked = [entries[i] for i in sample_indices(receipt["receipt_digest"], salt, len(entries), verification["sample_size"])]
    recomputed = recompute(picked) if picked else []
    tolerance = verification["distance_tolerance"]
    checked = tuple(
        {"nonce": e["nonce"], "node": e["node"], "claimed": e["distance"], "recomputed": r,
         "ok": abs(r - e["distance"]) <= tolerance}
        for e, r in zip(picked, recomputed)
    )
    failures = sum(not c["ok"] for c in checked)
    p_value = binomial_p_value(failures, len(checked), verification["tolerated_failure_rate"])
    accepted = p_value >= verification["significance"]
    reasons: tuple[str, ...] = ()
    if not accepted:
        bad = ", ".join(str(c["nonce"]) for c in checked if not c["ok"])
        reasons = (f"{failures} of {len(checked)} sampled nonces do not reproduce their distance within "
                   f"{tolerance} (nonces {bad}); binomial p={p_value:.3g} < {verification['significance']}",)
    elif not entries:
        reasons = ("no valid nonces claimed: nothing to recompute, proven weight is zero",)
    return Verdict(
        accepted=accepted, kind=receipt["kind"], receipt_digest=receipt["receipt_digest"], reasons=reasons,
        sampled=len(checked), failures=failures, p_value=p_value, salt=salt, checked=checked,
    )


def verify_receipt(receipt: Any, salt: str = "") -> Verdict:
    """Verify a receipt of any registered kind; malformed input yields a rejection, never an exception."""
    from nexus.proofs.registry import get_kind  # the registry imports kinds, which import this module

    if not isinstance(receipt, dict):
        return Verdict.rejected("", "", "receipt is not a JSON object")
    kind_name, digest = str(receipt.get("kind", "")), str(receipt.get("receipt_digest", ""))
    reasons = check_integrity(receipt)
    if reasons:
        return Verdict.rejected(kind_name, digest, *reasons)
    try:
        kind = get_kind(kind_name)
    except ValueError as unknown:
        return Verdict.rejected(kind_name, digest, str(unknown))
    return kind.verify(receipt, salt=salt)


def verify_receipt_file(path: str | Path, salt: str = "") -> Verdict:
    """Offline verification of a receipt file: no cluster, no network."""
    try:
        receipt = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return Verdict.rejected("", "", f"cannot read receipt {path}: {error}")
    return verify_receipt(receipt, salt=salt)
