"""Proof jobs over real PostgreSQL, Redis, S3 and real `nexus worker` processes: a tiny proof end to
end, verification through the API, a segment lost with its worker and retried alone, cancellation,
and bad requests answered with a clear 4xx that leaves nothing behind."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from nexus.proofs import records
from nexus.proofs.receipts import reseal
from nexus.proofs.verify import verify_receipt
from tests.conftest import auth
from tests.support import start_worker, wait_for

pytestmark = pytest.mark.timeout(150)

# Segments for the proof workers' own tier queue: the session's cpu_only worker stays out of
# these tests, so they decide which worker runs what. (These workers compute on the CPU.)
PROOF_TIER = "gpu_infra"
PROOF_WORKER_ENV = {"NEXUS_WORKER_TIER": PROOF_TIER, "NEXUS_WORKER_CONCURRENCY": "2",
                    "NEXUS_PROOF_TORCH_THREADS": "1"}


def tiny(nonce_end=512, segment_size=128, **fields):
    return {"kind": "poc", "seed": "integration", "nonce_end": nonce_end, "segment_size": segment_size,
            "allow_cpu": True, "options": {"preset": "tiny"}, **fields}


def submit_proof(api, body):
    response = api.post("/api/v1/proofs", json=body, headers=auth())
    assert response.status_code == 201, response.json
    return response.json


def wait_job(api, job_id, timeout=60):
    job = api.get(f"/api/v1/jobs/{job_id}?wait={min(timeout, 30)}", headers=auth()).json
    if job["state"] not in ("succeeded", "failed", "cancelled"):
        job = wait_for(lambda: (j := api.get(f"/api/v1/jobs/{job_id}?wait=5", headers=auth()).json)["state"]
                       in ("succeeded", "failed", "cancelled") and j, timeout=timeout, what=f"job {job_id} final")
    return job


def segment_rows(services, proof_id):
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT id, state, attempt, node, (payload->'segment'->>'index')::int AS index FROM jobs "
            "WHERE parent_id = :id AND type = 'proof_segment' ORDER BY index"), {"id": proof_id}).mappings()]


def test_a_tiny_proof_end_to_end_through_real_workers(api, services, worker, verifier, reconciler):
    proof = submit_proof(api, tiny())
    assert proof["state"] == "queued" and proof["request"]["seed"] == "integration"
    assert wait_job(api, proof["id"])["state"] == "succeeded"

    view = api.get(f"/api/v1/proofs/{proof['id']}", headers=auth()).json
    receipt = view["receipt"]
    assert view["segments"] == {"succeeded": 4}
    assert view["progress"]["done"] == view["progress"]["total"] == 4
    assert receipt["nonce_range"] == [0, 512] and len(receipt["segments"]) == 4
    assert view["summary"]["merkle_root"] == receipt["merkle_root"]
    assert set(receipt["node_counts"]) <= {segment["node"] for segment in receipt["segments"]}
    assert view["verified"] is None and view["proven_weight"] == {}
    assert verify_receipt(receipt).accepted  # offline, from what the API handed out

    # Verification as a job on the master's verifier, not on a node that proved; the verdict and the
    # proven weight appear on the proof.
    response = api.post(f"/api/v1/proofs/{proof['id']}/verify", json={}, headers=auth())
    assert response.status_code == 202
    verify_job = wait_job(api, response.json["verify_job"]["id"])
    assert verify_job["state"] == "succeeded", verify_job["error"]
    assert verify_job["node"] == "master" and verify_job["queue"] == "master.proof_verify"
    view = api.get(f"/api/v1/proofs/{proof['id']}", headers=auth()).json
    assert view["verified"] is True and view["verdicts"][0]["verdict"]["sampled"] == receipt["valid_count"]
    assert view["proven_weight"] == receipt["node_counts"]
    assert api.get("/api/v1/proofs/weights", headers=auth()).json["weights"] == receipt["node_counts"]
    node, count = next(iter(receipt["node_counts"].items()))
    with services.engine.connect() as conn:
        assert records.proven_weight_of(conn, node) == count  # what the node API can show


def test_a_tampered_stored_receipt_is_rejected_by_the_verify_job(api, services, worker, verifier):
    proof = submit_proof(api, tiny(nonce_end=256))
    assert wait_job(api, proof["id"])["state"] == "succeeded"
    key = api.get(f"/api/v1/proofs/{proof['id']}", headers=auth()).json["summary"]["receipt_key"]
    honest = services.store.get_json(services.settings.bucket_receipts, key)

    def verdict_after_storing(receipt) -> dict:
        services.store.put_json(services.settings.bucket_receipts, key, receipt)
        response = api.post(f"/api/v1/proofs/{proof['id']}/verify", json={"salt": "fresh"}, headers=auth())
        job = wait_job(api, response.json["verify_job"]["id"])
        assert job["state"] == "succeeded", job["error"]
        return job["result"]["verdict"]

    edited = {**honest, "valid": [{**honest["valid"][0], "distance": 0.5}, *honest["valid"][1:]]}
    assert "receipt_digest does not match" in " ".join(verdict_after_storing(edited)["reasons"])
    resealed = reseal(edited)
    assert "not the one the proof job recorded" in verdict_after_storing(resealed)["reasons"][0]
    view = api.get(f"/api/v1/proofs/{proof['id']}", headers=auth()).json
    assert view["verified"] is False and view["proven_weight"] == {} and len(view["verdicts"]) == 2
    assert api.get("/api/v1/proofs/weights", headers=auth()).json["weights"] == {}


@pytest.fixture
def proof_workers(settings, session_dir):
    started = []

    def start(name, **env):
        started.append(start_worker(settings, session_dir, name=name, extra_env={**PROOF_WORKER_ENV, **env}))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_a_segment_lost_with_its_worker_is_retried_alone(api, services, reconciler, proof_workers):
    victim = proof_workers("proof-victim")
    body = tiny(nonce_end=8 * 3072, segment_size=3072, tier=PROOF_TIER)
    proof = submit_proof(api, body)

    def mid_flight():
        rows = segment_rows(services, proof["id"])
        return any(r["state"] == "succeeded" for r in rows) and any(r["state"] == "running" for r in rows) and rows

    before = wait_for(mid_flight, timeout=60, interval=0.05, what="a segment done and another running")
    victim.kill()  # SIGKILL: no goodbye, the leases just stop being renewed
    done_before = {r["index"] for r in before if r["state"] == "succeeded"}

    proof_workers("proof-rescuer")
    assert wait_job(api, proof["id"], timeout=90)["state"] == "succeeded"
    rows = segment_rows(services, proof["id"])
    assert all(r["state"] == "succeeded" for r in rows) and len(rows) == 8
    retried = {r["index"] for r in rows if r["attempt"] > 1}
    assert retried, "the segment running on the killed worker ran again"
    assert not retried & done_before, "finished segments are not proven again"
    assert all(r["node"] == "proof-victim" for r in rows if r["index"] in done_before)
    with services.engine.connect() as conn:
        messages = conn.execute(text("SELECT message FROM job_events WHERE job_id = ANY(:ids)"),
                                {"ids": [r["id"] for r in rows]}).scalars().all()
    assert "lease expired" in messages
    receipt = api.get(f"/api/v1/proofs/{proof['id']}", headers=auth()).json["receipt"]
    assert verify_receipt(receipt).accepted
    assert sum(receipt["node_counts"].values()) == receipt["valid_count"]


def cancel_a_waiting_segment(api, services, proof_id):
    """Cancel the last segment still waiting for a worker. A running one could finish before it sees
    the flag (the workers run alongside this test), so only a queued one makes the outcome certain."""
    waiting = [r for r in segment_rows(services, proof_id) if r["state"] == "queued"]
    assert waiting, "every segment had started before one could be cancelled"
    response = api.post(f"/api/v1/jobs/{waiting[-1]['id']}/cancel", headers=auth())
    assert response.status_code == 200 and response.json["state"] == "cancelled", response.json
    return waiting[-1]


def test_a_stopped_segment_fails_the_proof_and_a_retry_redoes_only_that_segment(api, services, reconciler,
                                                                              proof_workers):
    proof_workers("proof-retrier")
    proof = submit_proof(api, tiny(nonce_end=24 * 2048, segment_size=2048, tier=PROOF_TIER))
    wait_for(lambda: len(segment_rows(services, proof["id"])) == 24, what="segments submitted")
    stopped = cancel_a_waiting_segment(api, services, proof["id"])
    failed = wait_job(api, proof["id"])
    assert failed["state"] == "failed" and f"segment {stopped['index']} cancelled" in failed["error"]

    assert api.post(f"/api/v1/jobs/{proof['id']}/retry", headers=auth()).status_code == 200
    assert wait_job(api, proof["id"], timeout=90)["state"] == "succeeded"
    rows = segment_rows(services, proof["id"])
    assert all(r["state"] == "succeeded" and r["attempt"] == 1 for r in rows)  # none proven twice
    with services.engine.connect() as conn:
        history = conn.execute(text("SELECT to_state FROM job_events WHERE job_id = :id ORDER BY id"),
                               {"id": stopped["id"]}).scalars().all()
    assert history == ["queued", "cancelled", "retrying", "running", "succeeded"]
    assert verify_receipt(api.get(f"/api/v1/proofs/{proof['id']}", headers=auth()).json["receipt"]).accepted


def test_cancelling_a_proof_cancels_its_segments(api, services, proof_workers):
    proof_workers("proof-canceller")
    proof = submit_proof(api, tiny(nonce_end=40 * 4096, segment_size=4096, tier=PROOF_TIER))
    wait_for(lambda: any(r["state"] == "running" for r in segment_rows(services, proof["id"])), timeout=60,
             what="a segment running")
    assert api.post(f"/api/v1/jobs/{proof['id']}/cancel", headers=auth()).status_code == 200
    assert wait_job(api, proof["id"])["state"] == "cancelled"
    wait_for(lambda: all(r["state"] in ("cancelled", "succeeded") for r in segment_rows(services, proof["id"])),
             timeout=30, what="segments stopped")
    rows = segment_rows(services, proof["id"])
    assert sum(r["state"] == "cancelled" for r in rows) > len(rows) // 2
    response = api.post(f"/api/v1/proofs/{proof['id']}/verify", json={}, headers=auth())
    assert response.status_code == 409 and "finished proof" in response.json["error"]["message"]


@pytest.mark.parametrize("body, fragment", [
    (tiny(nonce_start=-1), "nonce_start"),
    (tiny(nonce_start=100, nonce_end=50), "0 <= nonce_start < nonce_end"),
    (tiny(kind="grind"), "unknown proof kind"),
    (tiny(nonce_end=10 ** 12), "at most"),
    (tiny(nonce_end=2 ** 62), "largest nonce"),
    (tiny(segment_size=10 ** 9), "segment_size"),
    (tiny(nonce_end=10 ** 7, segment_size=10), "segments of 10 nonces"),
    (tiny(options={"preset": "galaxy"}), "unknown poc preset"),
    (tiny(options={"preset": "tiny", "verification": {"sample_size": 10 ** 6}}), "sample_size"),
    (tiny(allow_cpu=False, tier="cpu_only"), "allow_cpu"),
    (tiny(nonce_end="lots"), "nonce_end"),
    ({**tiny(), "surprise": 1}, "surprise"),
])
def test_bad_proof_requests_get_a_clear_400_and_leave_nothing(api, services, body, fragment):
    response = api.post("/api/v1/proofs", json=body, headers=auth())
    assert response.status_code == 400, response.json
    assert fragment in str(response.json["error"]), response.json
    through_jobs = api.post("/api/v1/jobs", json={"type": "proof", "payload": body}, headers=auth())
    assert through_jobs.status_code == 400 and fragment in str(through_jobs.json["error"]), through_jobs.json
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0


def test_proof_routes_refuse_what_is_not_a_proof(api, services):
    other = api.post("/api/v1/jobs", json={"type": "noop"}, headers=auth()).json
    assert api.get(f"/api/v1/proofs/{other['id']}", headers=auth()).status_code == 404
    missing = "00000000-0000-0000-0000-000000000000"
    assert api.get(f"/api/v1/proofs/{missing}", headers=auth()).status_code == 404
    assert api.post(f"/api/v1/proofs/{missing}/verify", json={}, headers=auth()).status_code == 404
    assert api.post(f"/api/v1/proofs/{other['id']}/verify", json={"salt": 5}, headers=auth()).status_code == 400
    assert api.get("/api/v1/proofs/weights").status_code == 401


def test_nexus_prove_on_the_cluster_then_nexus_verify(live_api, worker, services, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from nexus.cli import main

    url, token = live_api
    monkeypatch.setenv("NEXUS_URL", url)
    monkeypatch.setenv("NEXUS_TOKEN", token)
    runner = CliRunner()
    receipt_path = tmp_path / "receipt.json"
    proved = runner.invoke(main, ["prove", "--nonces", "0:384", "--segment-size", "128", "--allow-cpu",
                                  "--seed", "cli", "-o", str(receipt_path), "--timeout", "60"])
    assert proved.exit_code == 0, proved.output
    assert len(json.loads(receipt_path.read_text())["segments"]) == 3
    verified = runner.invoke(main, ["verify", str(receipt_path)])
    assert verified.exit_code == 0, verified.output
    refused = runner.invoke(main, ["prove", "--nonces", "9:3", "--allow-cpu", "-o", str(tmp_path / "x.json")])
    assert refused.exit_code != 0 and "nonce_start < nonce_end" in refused.output


def test_a_waiting_proof_wakes_when_its_last_segment_ends_not_at_its_next_poll(api, services, live_api, reconciler,
                                                                             proof_workers):
    """The proof polls its segments every 30 s here and proves none itself: it must still finish within a
    second of its last segment, woken by the segment's completion notice (nexus.jobs.notify.ChildNotices).
    Before, it slept out its poll: up to 0.5 s late by default, 30 s here."""
    proof_workers("proof-notices", NEXUS_PROOF_POLL_SECONDS="30", NEXUS_PROOF_PARENT_HELPS="false")
    proof = submit_proof(api, tiny(tier=PROOF_TIER))
    assert wait_job(api, proof["id"], timeout=60)["state"] == "succeeded"
    with services.engine.connect() as conn:
        parent_done, last_segment_done = conn.execute(text(
            "SELECT p.finished_at, max(s.finished_at) FROM jobs p JOIN jobs s ON s.parent_id = p.id "
            "WHERE p.id = :id GROUP BY p.finished_at"), {"id": proof["id"]}).one()
    assert (parent_done - last_segment_done).total_seconds() < 1.0
