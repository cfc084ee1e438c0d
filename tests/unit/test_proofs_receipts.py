"""Receipts verified offline: an honest one is accepted; every kind of tampering is rejected.

Tampered receipts are "resealed" (every digest and the Merkle root recomputed, as a careful
forger would) unless the test is about a digest itself, so what catches them is verification
proper: recomputed distances, the preset's parameters, the binomial test.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from nexus.proofs.base import SegmentResult
from nexus.proofs.compute import distances
from nexus.proofs.digests import merkle_root, sha256_hex
from nexus.proofs.local import prove_locally
from nexus.proofs.receipts import join_results, receipt_digest, reseal
from nexus.proofs.registry import get_kind
from nexus.proofs.requests import parse_proof_request
from nexus.proofs.verify import binomial_p_value, sample_indices, verify_receipt

pytestmark = pytest.mark.timeout(120)


def tiny_request(**fields):
    body = {"kind": "poc", "seed": "receipt-tests", "nonce_end": 512, "segment_size": 128,
            "options": {"preset": "tiny"}, **fields}
    return parse_proof_request(body)


@pytest.fixture(scope="module")
def honest() -> dict:
    """Four segments, proven by two nodes alternately (as two workers would)."""
    request = tiny_request()
    kind = get_kind("poc")
    results = [kind.prove(s, "node-a" if s.index % 2 == 0 else "node-b") for s in kind.split(request)]
    receipt = join_results(request, results)
    assert len(receipt["valid"]) <= receipt["verification"]["sample_size"], "tests assume every nonce is sampled"
    return receipt


def tampered(receipt: dict, edit) -> dict:
    forged = copy.deepcopy(receipt)
    edit(forged)
    return reseal(forged)


def test_an_honest_receipt_is_accepted(honest):
    verdict = verify_receipt(honest)
    assert verdict.accepted, verdict.reasons
    assert verdict.sampled == honest["valid_count"] > 20 and verdict.failures == 0
    assert set(honest["node_counts"]) == {"node-a", "node-b"}
    assert sum(honest["node_counts"].values()) == honest["valid_count"]
    assert all(c["ok"] and abs(c["claimed"] - c["recomputed"]) < 1e-6 for c in verdict.checked)


def test_a_receipt_survives_a_json_round_trip(honest, tmp_path):
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(honest))
    assert verify_receipt(json.loads(path.read_text())).accepted


def test_local_proof_matches_the_segment_by_segment_one():
    request = tiny_request(nonce_end=256)
    kind = get_kind("poc")
    by_hand = join_results(request, [kind.prove(s, "node-a") for s in kind.split(request)])
    local = prove_locally(request, "node-a")
    # Timings differ between runs and sit outside the segment digests, so the Merkle root agrees.
    assert local["merkle_root"] == by_hand["merkle_root"] and local["valid"] == by_hand["valid"]


def test_a_fabricated_nonce_is_rejected(honest):
    r_target = honest["parameters"]["r_target"]
    claimed = {e["nonce"] for e in honest["valid"]}
    invalid = next(n for n in range(512) if n not in claimed)
    segment = honest["segments"][invalid // 128]
    assert distances(honest["seed"], honest["parameters"], segment["node"], [invalid])[0] >= r_target

    def add(receipt):
        receipt["valid"].append({"nonce": invalid, "node": segment["node"], "distance": round(r_target - 0.01, 6)})
        receipt["valid"].sort(key=lambda e: e["nonce"])

    verdict = verify_receipt(tampered(honest, add))
    assert not verdict.accepted
    assert verdict.failures == 1 and str(invalid) in verdict.reasons[0]


def test_an_edited_distance_is_rejected(honest):
    def edit(receipt):
        receipt["valid"][3]["distance"] = round(receipt["valid"][3]["distance"] - 0.01, 6)

    verdict = verify_receipt(tampered(honest, edit))
    assert not verdict.accepted and verdict.failures == 1


def test_a_changed_merkle_root_is_rejected(honest):
    forged = copy.deepcopy(honest)
    forged["merkle_root"] = sha256_hex(b"another tree")
    forged["receipt_digest"] = receipt_digest(forged)
    verdict = verify_receipt(forged)
    assert not verdict.accepted
    assert any("Merkle root" in reason for reason in verdict.reasons)


def test_a_changed_segment_digest_is_rejected(honest):
    forged = copy.deepcopy(honest)
    forged["segments"][1]["digest"] = sha256_hex(b"not this segment")
    forged["merkle_root"] = merkle_root([s["digest"] for s in forged["segments"]])
    forged["receipt_digest"] = receipt_digest(forged)
    verdict = verify_receipt(forged)
    assert not verdict.accepted and "segment 1: digest" in verdict.reasons[0]


def test_an_edit_without_a_new_receipt_digest_is_rejected(honest):
    forged = copy.deepcopy(honest)
    forged["nonce_range"] = [0, 511]
    forged["segments"][-1]["nonce_end"] = 511
    assert not verify_receipt(forged).accepted


@pytest.mark.parametrize("name, value", [("n_layers", 1), ("r_target", 1.45), ("dim", 32), ("preset", "huge")])
def test_a_changed_parameter_is_rejected(honest, name, value):
    verdict = verify_receipt(tampered(honest, lambda r: r["parameters"].__setitem__(name, value)))
    assert not verdict.accepted
    assert name in verdict.reasons[0] or "preset" in verdict.reasons[0]


def test_a_changed_seed_is_rejected(honest):
    verdict = verify_receipt(tampered(honest, lambda r: r.__setitem__("seed", "another seed")))
    assert not verdict.accepted and verdict.failures > 0


def test_claiming_another_nodes_segment_is_rejected(honest):
    """The node is part of each nonce's inputs: node-b's nonces do not reproduce as node-a's."""
    def steal(receipt):
        for segment in receipt["segments"]:
            segment["node"] = "node-a"
        for entry in receipt["valid"]:
            entry["node"] = "node-a"

    verdict = verify_receipt(tampered(honest, steal))
    assert not verdict.accepted and verdict.failures > 0


def test_loosened_verification_parameters_are_rejected(honest):
    forged = tampered(honest, lambda r: r["verification"].update(tolerated_failure_rate=0.5, sample_size=1))
    verdict = verify_receipt(forged)
    assert not verdict.accepted
    reasons = " ".join(verdict.reasons)
    assert "tolerated_failure_rate" in reasons and "sample_size" in reasons


@pytest.mark.parametrize("garbage", [
    None, [], "receipt", {}, {"kind": "poc"},
    "NONFINITE", "UNKNOWN_KIND", "OUT_OF_RANGE", "UNSORTED",
])
def test_malformed_receipts_are_rejected_never_raise(honest, garbage):
    if garbage == "NONFINITE":
        garbage = copy.deepcopy(honest)
        garbage["valid"][0]["distance"] = float("nan")
    elif garbage == "UNKNOWN_KIND":
        garbage = tampered(honest, lambda r: r.__setitem__("kind", "nope"))
    elif garbage == "OUT_OF_RANGE":
        garbage = tampered(honest, lambda r: r["valid"].append({"nonce": 10_000, "node": "node-a", "distance": 1.0}))
    elif garbage == "UNSORTED":
        garbage = tampered(honest, lambda r: r["valid"].reverse())
    verdict = verify_receipt(garbage)
    assert not verdict.accepted and verdict.reasons


def test_a_segment_result_with_a_wrong_digest_is_refused(honest):
    kind = get_kind("poc")
    result = kind.prove(kind.split(tiny_request(nonce_end=64, segment_size=64))[0], "node-a")
    data = result.to_dict()
    assert SegmentResult.from_dict(data).digest == result.digest
    data["valid"] = data["valid"][1:]
    with pytest.raises(ValueError, match="digest"):
        SegmentResult.from_dict(data)


def test_join_refuses_a_missing_or_foreign_segment():
    request = tiny_request(nonce_end=256)
    kind = get_kind("poc")
    results = [kind.prove(s, "node-a") for s in kind.split(request)]
    with pytest.raises(ValueError, match="exactly one result per segment"):
        join_results(request, results[:1])
    other = kind.prove(kind.split(tiny_request(nonce_end=256, seed="other"))[1], "node-a")
    with pytest.raises(ValueError, match="different segment"):
        join_results(request, [results[0], other])


def test_the_sample_is_fixed_by_the_digest_and_the_salt():
    assert sample_indices("d" * 64, "", 1000, 16) == sample_indices("d" * 64, "", 1000, 16)
    assert sample_indices("d" * 64, "salt", 1000, 16) != sample_indices("d" * 64, "", 1000, 16)
    assert sample_indices("d" * 64, "", 5, 16) == [0, 1, 2, 3, 4]


def test_binomial_threshold():
    assert binomial_p_value(0, 64, 0.0005) == 1.0
    assert binomial_p_value(1, 64, 0.0005) < 0.05  # one bad sampled nonce rejects under the defaults
    assert binomial_p_value(1, 64, 0.05) > 0.5  # a lax receipt would tolerate it: hence the policy bounds


def test_merkle_root_depends_on_order_and_does_not_duplicate_odd_leaves():
    leaves = [sha256_hex(bytes([i])) for i in range(3)]
    assert merkle_root(leaves) != merkle_root(leaves[::-1])
    assert merkle_root(leaves) != merkle_root(leaves + leaves[-1:])
    assert merkle_root(leaves[:1]) != leaves[0]  # a leaf is hashed with its own prefix


def test_nexus_verify_cli_works_offline(honest, tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(honest))
    bad.write_text(json.dumps(tampered(honest, lambda r: r["valid"][0].__setitem__("distance", 0.5))))
    env_free = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no NEXUS_* settings: no cluster at all
    ok = subprocess.run([sys.executable, "-m", "nexus", "verify", str(good)], capture_output=True, text=True,
                        env=env_free, timeout=90)
    assert ok.returncode == 0, ok.stderr
    assert "ACCEPTED" in ok.stderr
    rejected = subprocess.run([sys.executable, "-m", "nexus", "verify", "--json", str(bad)], capture_output=True,
                              text=True, env=env_free, timeout=90)
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout)["accepted"] is False
