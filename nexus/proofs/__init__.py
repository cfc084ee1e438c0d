"""Proof jobs: proof kinds (split, prove, join, verify), the built-in proof-of-compute
kind `poc`, receipts with digests and a Merkle root, and offline verification."""

from nexus.proofs.base import ProofKind, ProofRequest, Segment, SegmentResult, ValidNonce, Verdict
from nexus.proofs.registry import available_kinds, get_kind
from nexus.proofs.requests import parse_proof_request, validate_proof_request
from nexus.proofs.verify import verify_receipt, verify_receipt_file

__all__ = [
    "ProofKind", "ProofRequest", "Segment", "SegmentResult", "ValidNonce", "Verdict",
    "available_kinds", "get_kind", "parse_proof_request", "validate_proof_request",
    "verify_receipt", "verify_receipt_file",
]
