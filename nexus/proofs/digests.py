"""Canonical JSON, SHA-256 digests and the Merkle root over segment digests.

Everything a verifier recomputes is hashed from canonical JSON: sorted keys, no
whitespace, UTF-8, floats in Python's shortest round-trip form. Two machines that
agree on the values agree on the bytes, so they agree on the digest.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# Domain separation (RFC 6962): a leaf can never be mistaken for an inner node,
# so no one can present two segments' digests as one "segment".
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that every digest is taken over."""
    _reject_non_finite(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    """SHA-256 of the canonical JSON form, as 64 lower-case hex characters."""
    return sha256_hex(canonical_json(obj))


def merkle_root(leaf_digests: list[str]) -> str:
    """RFC 6962 Merkle tree hash over hex digests, in the order given.

    The tree splits at the largest power of two below the leaf count, so an odd
    leaf is never duplicated (duplication lets two different lists share a root).
    """
    if not leaf_digests:
        return sha256_hex(b"")
    return _tree_hash([bytes.fromhex(d) for d in leaf_digests]).hex()


def _tree_hash(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return hashlib.sha256(_LEAF_PREFIX + leaves[0]).digest()
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    left, right = _tree_hash(leaves[:split]), _tree_hash(leaves[split:])
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def is_hex_digest(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 64:
        return False
    return all(c in "0123456789abcdef" for c in value)


def _reject_non_finite(obj: Any) -> None:
    # json.dumps(allow_nan=False) raises a bare ValueError; say which value instead.
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number {obj!r} cannot be hashed as JSON")
    if isinstance(obj, dict):
        for value in obj.values():
            _reject_non_finite(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _reject_non_finite(value)
