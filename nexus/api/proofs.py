"""Proofs: submit one, read its receipt and verdicts, verify it on a worker, proven weights.

A proof is a job of type `proof` (POST /api/v1/jobs with that type works too);
these routes add what a job view lacks: the receipt, the verdicts and the
proven weight. Verification runs as a `proof_verify` job, a child of the proof.
"""

from __future__ import annotations

import uuid
from typing import Any

from apiflask import APIBlueprint
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from nexus.api.errors import ApiError
from nexus.api.answers import ProofView, VerifyStarted, Weights
from nexus.api.jobs import answer_ref, load_job
from nexus.api.limits import check_priority
from nexus.api.security import caller, require, services
from nexus.api.views import job_view, jsonable, row_view
from nexus.auth import Role
from nexus.jobs.records import Job
from nexus.proofs import records
from nexus.proofs.jobs import PROOF_TYPE, VERIFY_TYPE
from nexus.proofs.placement import segment_requirements
from nexus.proofs.requests import MAX_SEED_LENGTH, REQUEST_FIELDS
from nexus.storage.store import ObjectNotFound

bp = APIBlueprint("proofs", __name__, url_prefix="/api/v1/proofs", tag="Proofs")

# Receipts with more valid nonces than this are linked (receipt_url), not inlined.
INLINE_RECEIPT_MAX_NONCES = 10_000


class ProofSubmission(BaseModel):
    """A proof to run. Ranges and sizes are checked by the proof kind (nexus.proofs.requests)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("poc", min_length=1, max_length=64, description="a registered proof kind")
    seed: str | None = Field(None, min_length=1, max_length=MAX_SEED_LENGTH, description="drawn when absent")
    nonce_start: StrictInt = 0
    nonce_end: StrictInt = Field(description="exclusive")
    segment_size: StrictInt | None = Field(None, description="nonces per segment job; the kind's default when absent")
    allow_cpu: StrictBool = Field(False, description="let CPU workers prove segments (GPU tiers otherwise)")
    tier: str | None = Field(None, max_length=32, description="pin every segment to this tier's queue")
    options: dict[str, Any] = Field(default_factory=dict, description='kind options, e.g. {"preset": "tiny"}')
    priority: StrictInt = Field(5, ge=0, le=9)
    max_attempts: StrictInt | None = Field(None, ge=1, le=100, description="of the proof job itself")
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    salt: str = Field("", max_length=MAX_SEED_LENGTH,
                      description="changes which nonces are sampled; pass a fresh one if you distrust the prover")


@bp.post("")
@bp.input(ProofSubmission, arg_name="body")
@bp.output(ProofView, status_code=201, description="created")
@bp.doc(security="bearer", responses={200: answer_ref("an idempotent repeat: the existing proof", "ProofView")})
@require(Role.SUBMITTER)
def submit(body: ProofSubmission):
    check_priority(caller(), body.priority, services().settings)
    payload = body.model_dump(include=set(REQUEST_FIELDS), exclude_none=True)
    job = {"type": PROOF_TYPE, "payload": payload, "priority": body.priority,
           # The proof job waits where its segments run, so that it can help prove them.
           "requirements": segment_requirements(body.allow_cpu, body.tier)}
    if body.max_attempts is not None:
        job["max_attempts"] = body.max_attempts
    if body.idempotency_key is not None:
        job["idempotency_key"] = body.idempotency_key
    [(row, created)] = services().submitter.submit_many([job], tenant=caller().tenant)
    return _proof_view(row), 201 if created else 200


@bp.get("/<uuid:proof_id>")
@bp.output(ProofView)
@bp.doc(security="bearer")
def get_proof(proof_id: uuid.UUID):
    """The proof's state and progress, its receipt once finished, its verdicts and proven weight."""
    return _proof_view(_load_proof(proof_id))


@bp.post("/<uuid:proof_id>/verify")
@bp.input(VerifyRequest, arg_name="body")
@bp.output(VerifyStarted, status_code=202, description="the verification job; its verdict appears on the proof")
@bp.doc(security="bearer", responses={409: "the proof has not finished"})
@require(Role.SUBMITTER)
def verify(proof_id: uuid.UUID, body: VerifyRequest):
    proof = _load_proof(proof_id)
    if proof.state != "succeeded":
        raise ApiError(409, f"only a finished proof can be verified; this one is {proof.state}",
                       {"state": proof.state})
    job = {"type": VERIFY_TYPE, "payload": {"proof_id": str(proof_id), "salt": body.salt}, "priority": proof.priority,
           "requirements": proof.requirements}
    [(row, _created)] = services().submitter.submit_many([job], tenant=proof.tenant, parent_id=proof_id,
                                                         allow_internal=True)
    s = services()
    return {"proof_id": str(proof_id), "verify_job": job_view(row, s.store, s.settings.bucket_outputs)}, 202


@bp.get("/weights")
@bp.output(Weights)
@bp.doc(security="bearer")
def weights():
    """Proven weight per node: valid nonces of proofs whose latest verification accepted them."""
    tenant = None if caller().is_admin else caller().tenant
    with services().statements.connect() as conn:
        return {"weights": records.proven_weights(conn, tenant)}


def _load_proof(proof_id: uuid.UUID) -> Job:
    job = load_job(proof_id)
    if job.type != PROOF_TYPE:
        raise ApiError(404, f"proof {proof_id} not found (job {proof_id} is a {job.type} job)")
    return job


_PROOF_FIELDS = ("id", "state", "tenant", "attempt", "progress", "error", "node", "created_at", "started_at",
                 "finished_at")


def _proof_view(row: Job) -> dict:
    with services().statements.connect() as conn:
        segments = records.segment_states(conn, row.id)
        verdict_rows = records.verdicts(conn, row.id)
    view = {name: jsonable(getattr(row, name)) for name in _PROOF_FIELDS}
    view.update({"request": row.payload, "summary": row.result, "segments": segments,
                 "verdicts": [row_view(v) for v in verdict_rows]})
    latest = records.latest_verdict(verdict_rows)
    view["verified"] = None if latest is None else bool(latest["accepted"])
    view["proven_weight"] = (row.result or {}).get("node_counts", {}) if view["verified"] else {}
    view.update(_receipt_fields(row))
    return view


def _receipt_fields(row: Job) -> dict:
    result = row.result or {}
    if row.state != "succeeded" or "receipt_key" not in result:
        return {"receipt": None, "receipt_url": None}
    s = services()
    bucket = s.settings.bucket_receipts
    fields: dict[str, Any] = {"receipt_url": s.store.presigned_get(bucket, result["receipt_key"]), "receipt": None}
    if result.get("valid_count", 0) <= INLINE_RECEIPT_MAX_NONCES:
        try:
            fields["receipt"] = s.store.get_json(bucket, result["receipt_key"])
        except ObjectNotFound:
            raise ApiError(410, "the proof's receipt is no longer in the object store",
                           {"receipt_key": result["receipt_key"]}) from None
    return fields
