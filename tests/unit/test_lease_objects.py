"""Which objects a lease opens (nexus.api.leases): pure rules, no server."""

from __future__ import annotations

import uuid

from nexus.api.leases import LeaseHolder, may_read, may_write, plain_key
from nexus.proofs.objects import receipt_key, segment_result_key

JOB, PARENT, OTHER = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def holder(type_: str = "inference", payload=None, parent=None, input_key="tenant/in") -> LeaseHolder:
    return LeaseHolder(JOB, 2, type_, input_key, parent, payload or {})


def test_inputs_only_the_jobs_own_and_read_only():
    assert may_read(holder(), "inputs", "tenant/in") is True
    assert may_read(holder(), "inputs", "other-tenant/in") is False
    assert may_read(holder(input_key=None), "inputs", "tenant/in") is False
    assert may_write(holder(), "inputs", "tenant/in") is False


def test_outputs_its_own_its_parents_and_maybe_a_childs():
    job = holder(parent=PARENT)
    assert may_write(job, "outputs", f"jobs/{JOB}/results.jsonl")
    assert not may_write(job, "outputs", f"jobs/{PARENT}/chunks/00000.jsonl")
    assert may_read(job, "outputs", f"jobs/{PARENT}/chunks/00000.jsonl") is True
    assert may_read(job, "outputs", f"jobs/{OTHER}/results.jsonl") == OTHER  # if it is a child: the database says
    assert may_read(job, "outputs", "jobs/not-a-uuid/x") is False
    assert may_read(job, "outputs", "elsewhere/x") is False


def test_receipts_exactly_its_own_and_a_proof_reads_its_segments():
    proof = holder("proof")
    assert may_write(proof, "receipts", receipt_key(JOB))
    assert not may_write(proof, "receipts", receipt_key(OTHER))
    assert may_read(proof, "receipts", f"proofs/{JOB}/segments/000001/{OTHER}-1.json") is True
    assert may_read(proof, "receipts", f"proofs/{OTHER}/segments/000001/x.json") is False
    segment = holder("proof_segment", {"proof_id": str(PARENT), "segment": {"index": 3}}, parent=PARENT)
    assert may_write(segment, "receipts", segment_result_key(PARENT, 3, JOB, 2))
    assert not may_write(segment, "receipts", segment_result_key(PARENT, 3, JOB, 1))  # another attempt's
    assert not may_write(segment, "receipts", segment_result_key(PARENT, 4, JOB, 2))
    forged = holder("proof_segment", {"proof_id": str(OTHER), "segment": {"index": 3}}, parent=PARENT)
    assert not may_write(forged, "receipts", segment_result_key(OTHER, 3, JOB, 2))  # not its parent's proof
    assert may_read(segment, "receipts", receipt_key(PARENT)) is False


def test_keys_have_no_dot_segments():
    assert plain_key(f"jobs/{JOB}/chunks/00001.jsonl")
    for key in ("", f"jobs/{JOB}/../{OTHER}/x", f"jobs/{JOB}/./x", f"jobs/{JOB}//x", "/jobs/x", "jobs\\x", "a\nb"):
        assert not plain_key(key), key
