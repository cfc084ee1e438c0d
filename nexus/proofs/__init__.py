"""Proof jobs: proof kinds (split, prove, join, verify), the built-in proof-of-compute
kind `poc`, receipts with digests and a Merkle root, and offline verification.

Import the modules themselves (`nexus.proofs.verify`, `.registry`, `.base`…): this file imports
nothing, so the API's `nexus.proofs.records` does not load the verifier's numpy on the way."""
