"""The shapes every proof kind shares: request, segment, segment result, verdict.

A proof kind is four steps (docs/ARCHITECTURE.md, "Proofs are a task graph"):

    split(request)   -> segments          pure: nonce range into pieces
    prove(segment)   -> segment result    the compute, on any eligible worker
    join(results)    -> receipt           pure: merge, digests, Merkle root
    verify(receipt)  -> verdict           anyone, offline: recompute a sample

Everything here is plain data with to_dict/from_dict, because segments travel
as job payloads and results and receipts live in the object store as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from nexus.proofs.digests import digest_of

RECEIPT_FORMAT = "nexus.proof.receipt/1"

# Called between batches with (nonces done, nonces total); may raise to stop the
# work (the job runtime passes one that checks for cancellation).
BatchHook = Callable[[int, int], None]


@dataclass(frozen=True)
class ProofRequest:
    kind: str
    seed: str
    nonce_start: int
    nonce_end: int  # exclusive
    segment_size: int
    allow_cpu: bool
    parameters: dict[str, Any]  # kind-specific, fully resolved (what the receipt records)
    verification: dict[str, Any]  # sample_size, tolerated_failure_rate, significance, ...
    tier: str | None = None  # pin the segments to one tier's queue (placement only, not in the receipt)

    @property
    def nonce_count(self) -> int:
        return self.nonce_end - self.nonce_start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProofRequest":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class Segment:
    kind: str
    seed: str
    parameters: dict[str, Any]
    index: int
    nonce_start: int
    nonce_end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Segment":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ValidNonce:
    nonce: int
    distance: float


@dataclass(frozen=True)
class SegmentResult:
    segment: Segment
    node: str
    valid: tuple[ValidNonce, ...]
    # Facts about the run, outside the digest: they differ between honest reruns.
    device: str = ""
    elapsed_seconds: float = 0.0

    @property
    def digest(self) -> str:
        return segment_digest(self.segment, self.node, self.valid)

    @property
    def nonces_per_second(self) -> float:
        count = self.segment.nonce_end - self.segment.nonce_start
        return count / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "segment": self.segment.to_dict(),
            "node": self.node,
            "valid": [[v.nonce, v.distance] for v in self.valid],
            "device": self.device,
            "elapsed_seconds": self.elapsed_seconds,
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentResult":
        """Rebuild a stored result; refuse one whose recorded digest does not match its content."""
        result = cls(
            segment=Segment.from_dict(data["segment"]),
            node=data["node"],
            valid=tuple(ValidNonce(int(n), float(d)) for n, d in data["valid"]),
            device=data.get("device", ""),
            elapsed_seconds=float(data.get("elapsed_seconds", 0.0)),
        )
        if "digest" in data and data["digest"] != result.digest:
            raise ValueError(f"segment {result.segment.index}: stored digest does not match its content")
        return result


def segment_digest(segment: Segment, node: str, valid: tuple[ValidNonce, ...] | list[ValidNonce]) -> str:
    """The digest a verifier can recompute from a receipt alone."""
    return digest_of(
        {
            "kind": segment.kind,
            "seed": segment.seed,
            "parameters": segment.parameters,
            "index": segment.index,
            "nonce_start": segment.nonce_start,
            "nonce_end": segment.nonce_end,
            "node": node,
            "valid": [[v.nonce, v.distance] for v in valid],
        }
    )


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying a receipt: accepted or not, and why."""

    accepted: bool
    kind: str
    receipt_digest: str
    reasons: tuple[str, ...] = ()
    sampled: int = 0
    failures: int = 0
    p_value: float | None = None
    salt: str = ""
    checked: tuple[dict[str, Any], ...] = field(default=())  # per sampled nonce: claimed vs recomputed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        data["checked"] = list(self.checked)
        return data

    @classmethod
    def rejected(cls, kind: str, receipt_digest: str, *reasons: str) -> "Verdict":
        return cls(accepted=False, kind=kind, receipt_digest=receipt_digest, reasons=tuple(reasons))


@runtime_checkable
class ProofKind(Protocol):
    """What a proof kind provides. Register others under the entry-point group
    `nexus.proof_kinds` (an instance, or a class/factory taking no arguments)."""

    name: str

    def resolve(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
        """Kind-specific request options -> (parameters, verification, default segment size).
        Raises ValueError with a message fit for a 400 answer."""
        ...

    def split(self, request: ProofRequest) -> list[Segment]: ...

    def prove(self, segment: Segment, node: str, on_batch: BatchHook | None = None) -> SegmentResult: ...

    def join(self, request: ProofRequest, results: list[SegmentResult]) -> dict[str, Any]: ...

    def verify(self, receipt: dict[str, Any], salt: str = "") -> Verdict: ...
