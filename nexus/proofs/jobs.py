"""Proof jobs on the ordinary job machinery (docs/ARCHITECTURE.md, "Proofs are a task graph"):

    proof ── split ──> proof_segment x N   children, one per segment, idempotent per index,
      │                                    routed by nexus.proofs.placement, retried alone
      │ <─ wait ──      each writes its SegmentResult (JSON) to the receipts bucket and
      │                 returns the key and the digest; the row is what the parent trusts
      └─ join ──> receipt JSON in the receipts bucket, Merkle root over the segment digests
    proof_verify        a child of a finished proof (POST /api/v1/proofs/<id>/verify)

Why the parent waits rather than a separate join job. A join job would have to
be started by "the last segment to finish", which no segment can know from
inside its handler (its own completion is written after it returns), so that
needs a counter outside PostgreSQL or a reconciler pass. A waiting parent keeps
the graph in one place: progress is segments done / total, cancelling it
cascades to the segments (lifecycle.request_cancel), and a retried parent finds
its children again by their idempotency keys.

The cost is a worker slot held while waiting (a threads-pool worker has
NEXUS_WORKER_CONCURRENCY, 4 by default). The parent does not waste it: between
looks at its segments it claims one of its own queued segments, through the
normal conditional claim, and proves it itself (NEXUS_PROOF_PARENT_HELPS). A
message for that attempt that arrives later finds the job taken and is dropped.
So no number of waiting proofs can starve their segments of slots, not even on
one worker with concurrency 1. It only helps with segments routed to its own
queue: there it is known to be an eligible worker.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from nexus.jobs.records import Job
from nexus.jobs.context import JobCancelled, JobContext
from nexus.jobs.registry import JobType
from nexus.proofs.base import ProofRequest, Segment, SegmentResult, Verdict
from nexus.proofs.helping import SegmentHelper
from nexus.proofs.objects import receipt_key, segment_result_key
from nexus.proofs.placement import segment_requirements
from nexus.proofs.registry import get_kind
from nexus.proofs.requests import MAX_NONCE, MAX_SEGMENT_SIZE, MAX_SEED_LENGTH, validate_proof_request
from nexus.proofs.verify import verify_receipt
from nexus.storage.store import ObjectNotFound

SEGMENT_TYPE = "proof_segment"
VERIFY_TYPE = "proof_verify"
PROOF_TYPE = "proof"


class SegmentFailed(ValueError):
    """A segment used up its own attempts (or was cancelled on its own).

    A ValueError so the runtime records the proof as failed without retrying it
    automatically: the segment was already retried. POST /api/v1/jobs/<id>/retry
    on the proof gives its failed segments another round."""


# --- the segment job --------------------------------------------------------------------

def validate_segment(payload: Any) -> dict:
    if not isinstance(payload, dict) or set(payload) != {"proof_id", "segment"}:
        raise ValueError("a proof_segment payload is {proof_id, segment}")
    proof_id = str(uuid.UUID(str(payload["proof_id"])))
    try:
        segment = Segment.from_dict(payload["segment"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed segment: {exc}") from None
    get_kind(segment.kind)
    bounds = (segment.index, segment.nonce_start, segment.nonce_end)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in bounds):
        raise ValueError("segment index and nonce bounds must be integers")
    if not (0 <= segment.nonce_start < segment.nonce_end <= MAX_NONCE and segment.index >= 0):
        raise ValueError("segment must satisfy 0 <= nonce_start < nonce_end and index >= 0")
    if segment.nonce_end - segment.nonce_start > MAX_SEGMENT_SIZE:
        raise ValueError(f"a segment covers at most {MAX_SEGMENT_SIZE} nonces")
    return {"proof_id": proof_id, "segment": segment.to_dict()}


def proof_node(ctx: JobContext) -> str:
    """Whose work this is: the worker's node name, the name the nodes table and jobs.node use.
    The node is part of every nonce's inputs, so nobody can claim another node's nonces."""
    return ctx.node


def run_segment(ctx: JobContext, payload: dict) -> dict:
    limit_torch_threads(ctx.settings.proof_torch_threads)
    segment = Segment.from_dict(payload["segment"])
    node = proof_node(ctx)

    def on_batch(done: int, total: int) -> None:
        ctx.check_cancelled()
        ctx.progress(done, total)

    result = get_kind(segment.kind).prove(segment, node, on_batch)
    key = segment_result_key(payload["proof_id"], segment.index, ctx.job_id, ctx.attempt)
    ctx.storage.put_json(ctx.settings.bucket_receipts, key, result.to_dict())
    return {
        "index": segment.index, "result_key": key, "digest": result.digest, "node": node,
        "valid_count": len(result.valid), "nonces": segment.nonce_end - segment.nonce_start,
        "device": result.device, "elapsed_seconds": result.elapsed_seconds,
    }


_threads_lock = threading.Lock()


def limit_torch_threads(threads: int) -> None:
    """Apply NEXUS_PROOF_TORCH_THREADS (process-wide; 0 leaves torch's default)."""
    if threads <= 0:
        return
    import torch

    with _threads_lock:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# --- the proof job: split, wait (and help), join -------------------------------------------

def validate_proof(payload: Any) -> dict:
    return validate_proof_request(payload)


def run_proof(ctx: JobContext, payload: dict) -> dict:
    started = time.monotonic()
    request = ProofRequest.from_dict(payload)
    kind = get_kind(request.kind)
    segments = kind.split(request)
    own = _own_row(ctx)
    _submit_segments(ctx, request, segments, own.priority)
    if ctx.attempt > 1:
        # Only a retried proof revives stopped segments: on a first attempt a segment stopped
        # already was cancelled by someone just now, and that cancel must stand.
        _retry_stopped_segments(ctx)
    rows = _wait_for_segments(ctx, segments, own.queue)
    results = [_load_result(ctx, row) for row in rows]
    receipt = kind.join(request, results)
    key = receipt_key(ctx.job_id)
    ctx.storage.put_json(ctx.settings.bucket_receipts, key, receipt)
    elapsed = time.monotonic() - started
    return {
        "receipt_key": key, "receipt_digest": receipt["receipt_digest"], "merkle_root": receipt["merkle_root"],
        "kind": request.kind, "segments": len(segments), "nonces": request.nonce_count,
        "valid_count": receipt["valid_count"], "node_counts": receipt["node_counts"],
        "elapsed_seconds": round(elapsed, 3), "nonces_per_second": round(request.nonce_count / elapsed, 1),
    }


def _own_row(ctx: JobContext) -> Job:
    return ctx.own_job()


def _submit_segments(ctx: JobContext, request: ProofRequest, segments: list[Segment], priority: int) -> None:
    requirements = segment_requirements(request.allow_cpu, request.tier)
    ctx.submit_children([
        {"type": SEGMENT_TYPE, "payload": {"proof_id": str(ctx.job_id), "segment": s.to_dict()},
         "requirements": requirements, "priority": priority, "idempotency_key": f"segment-{s.index}"}
        for s in segments
    ])


def _retry_stopped_segments(ctx: JobContext) -> None:
    """A retried proof gives segments that failed or were cancelled another attempt."""
    for row in _segment_rows(ctx):
        if row["state"] in ("failed", "cancelled"):
            ctx.retry_child(row["id"])


def _segment_rows(ctx: JobContext) -> list[dict]:
    """The segments as the waiting proof polls them, in index order; from the master, never a replica:
    these states decide what happens next. `result` and `error` are read at the join."""
    rows = [{"id": c.job.id, "state": c.job.state, "attempt": c.job.attempt, "queue": c.job.queue,
             "index": int(c.job.payload["segment"]["index"]), "due": c.due, "failed_here": ctx.node in c.failed_nodes,
             "result": c.job.result, "error": c.job.error}
            for c in ctx.child_statuses() if c.job.type == SEGMENT_TYPE]
    return sorted(rows, key=lambda r: r["index"])


def _wait_for_segments(ctx: JobContext, segments: list[Segment], queue: str) -> list[dict]:
    """Until every segment succeeded: report progress, help with queued segments, else sleep."""
    total = len(segments)
    helper = SegmentHelper(ctx, queue) if ctx.settings.proof_parent_helps else None
    with ctx.child_notices() as notices:
        while True:
            ctx.check_cancelled()
            rows = _segment_rows(ctx)
            done = sum(r["state"] == "succeeded" for r in rows)
            ctx.progress(done, total, f"{done}/{total} segments proven")
            if any(r["state"] in ("failed", "cancelled") for r in rows):
                _raise_for_stopped_segment(ctx)
            if done == total:
                return rows
            if helper is None or not helper.prove_one(rows):
                notices.sleep(ctx.settings.proof_poll_seconds, [r["id"] for r in rows if r["state"] != "succeeded"])


def _raise_for_stopped_segment(ctx: JobContext) -> None:
    if ctx.own_job().cancel_requested:
        # Cancelling the proof cancelled its waiting segments at once; the flag may reach this
        # attempt a heartbeat later. The proof was cancelled, not failed.
        raise JobCancelled(str(ctx.job_id))
    first = next(r for r in _segment_rows(ctx) if r["state"] in ("failed", "cancelled"))
    raise SegmentFailed(f"segment {first['index']} {first['state']} after {first['attempt']} attempt(s): "
                        f"{first['error'] or 'cancelled'}")


def _load_result(ctx: JobContext, row: dict) -> SegmentResult:
    """The segment result the row points at, refused unless it is exactly what the row recorded."""
    recorded = row["result"] or {}
    try:
        data = ctx.storage.get_json(ctx.settings.bucket_receipts, recorded["result_key"])
    except ObjectNotFound:
        raise ValueError(f"segment {row['index']}: its result {recorded['result_key']} is missing from the "
                         f"object store") from None
    result = SegmentResult.from_dict(data)  # checks the stored digest against the content
    if result.digest != recorded.get("digest"):
        raise ValueError(f"segment {row['index']}: stored result does not match the digest its job recorded")
    return result


# --- verification as a job ------------------------------------------------------------------

def validate_verify(payload: Any) -> dict:
    if not isinstance(payload, dict) or not set(payload) <= {"proof_id", "salt"} or "proof_id" not in payload:
        raise ValueError("a proof_verify payload is {proof_id, salt?}")
    salt = payload.get("salt", "")
    if not isinstance(salt, str) or len(salt) > MAX_SEED_LENGTH or not salt.isprintable():
        raise ValueError(f"salt must be a printable string of at most {MAX_SEED_LENGTH} characters")
    return {"proof_id": str(uuid.UUID(str(payload["proof_id"]))), "salt": salt}


def run_verify(ctx: JobContext, payload: dict) -> dict:
    limit_torch_threads(ctx.settings.proof_torch_threads)
    proof = _finished_proof(ctx, payload["proof_id"])
    receipt = ctx.storage.get_json(ctx.settings.bucket_receipts, proof.result["receipt_key"])
    recorded = proof.result["receipt_digest"]
    if not isinstance(receipt, dict) or receipt.get("receipt_digest") != recorded:
        # Replaced in the object store after the proof finished: whatever it says, it is not this proof.
        verdict = Verdict.rejected(proof.result.get("kind", ""), recorded,
                                   "the stored receipt is not the one the proof job recorded (its digest differs)")
    else:
        verdict = verify_receipt(receipt, salt=payload["salt"])
    return {"proof_id": payload["proof_id"], "verdict": verdict.to_dict()}


def _finished_proof(ctx: JobContext, proof_id: str) -> Job:
    """The proof this verification checks: its parent (the API creates it so); a worker reads no other job."""
    row = ctx.parent()
    if row is None or str(row.id) != proof_id or row.type != PROOF_TYPE or row.tenant != ctx.tenant:
        raise ValueError(f"proof {proof_id} not found")
    if row.state != "succeeded":
        raise ValueError(f"proof {proof_id} is {row.state}; only a finished proof has a receipt")
    return row


def proof_segments(payload: dict, _settings) -> int:
    return -(-(payload["nonce_end"] - payload["nonce_start"]) // payload["segment_size"])


proof = JobType(name=PROOF_TYPE, run=run_proof, validate=validate_proof, accepts_input=False, fan_out=proof_segments)
# Internal: segments are the proof's children, verification is started by POST /api/v1/proofs/<id>/verify.
proof_segment = JobType(name=SEGMENT_TYPE, run=run_segment, validate=validate_segment, accepts_input=False,
                        public=False)
# The verdict, and with it the proven weight, is recorded by the master's own verifier: a node may be
# among the proof's provers, and a prover must not judge its own work.
proof_verify = JobType(name=VERIFY_TYPE, run=run_verify, validate=validate_verify, accepts_input=False, public=False,
                       runs_on_master=True)
