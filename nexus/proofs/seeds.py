"""Deterministic randomness from seed strings.

`seed_sequence(s)` hashes `f"{s}_{i}"` for i < k with SHA-256 and feeds the
digests, as little-endian uint32 words, to numpy's SeedSequence. Every random
draw of a proof (weights pool, per-nonce inputs, permutations, target vector,
verification sample) goes through here, so any machine with numpy reproduces it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEFAULT_HASHES = 4  # 4 digests = 32 uint32 words = 1024 bits of entropy, more than the seed string carries


def seed_words(seed: str, hashes: int = DEFAULT_HASHES) -> list[int]:
    import numpy as np  # here, not at the top: the API validates proof requests without numpy

    words: list[int] = []
    for i in range(hashes):
        digest = hashlib.sha256(f"{seed}_{i}".encode()).digest()
        words.extend(int(w) for w in np.frombuffer(digest, dtype="<u4"))
    return words


def seed_sequence(seed: str, hashes: int = DEFAULT_HASHES) -> np.random.SeedSequence:
    import numpy as np

    return np.random.SeedSequence(seed_words(seed, hashes))


def rng(seed: str, hashes: int = DEFAULT_HASHES) -> np.random.Generator:
    """A PCG64 generator whose whole stream is fixed by `seed`."""
    import numpy as np

    return np.random.Generator(np.random.PCG64(seed_sequence(seed, hashes)))


def offset_for(name: str, modulus: int) -> int:
    """A stable offset in [0, modulus) derived from a name (tensor names, mostly)."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") % modulus
