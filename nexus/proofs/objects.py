"""Where proof bytes live in the object store (bucket `NEXUS_BUCKET_RECEIPTS`).

Job rows hold only these keys and the digests of what is behind them (docs/ARCHITECTURE.md,
"Queues carry routing"). Segment results are keyed by job id *and* attempt, so a fenced-off
attempt that still writes can never overwrite the result the row points at.
"""

from __future__ import annotations

import uuid


def segment_result_key(proof_id: uuid.UUID | str, index: int, job_id: uuid.UUID | str, attempt: int) -> str:
    return f"proofs/{proof_id}/segments/{index:06d}/{job_id}-{attempt}.json"


def receipt_key(proof_id: uuid.UUID | str) -> str:
    return f"proofs/{proof_id}/receipt.json"
