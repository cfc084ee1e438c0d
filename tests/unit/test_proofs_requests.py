"""Proof requests: what is accepted, what is refused (with a message fit for a 400), where segments
go, and proof kinds from other packages through the `nexus.proof_kinds` entry-point group."""

from __future__ import annotations

import sys
import textwrap

import pytest

from nexus.proofs import registry
from nexus.proofs.base import ProofRequest
from nexus.proofs.jobs import validate_segment, validate_verify
from nexus.proofs.placement import segment_requirements
from nexus.proofs.receipts import split_range
from nexus.proofs.requests import MAX_NONCES_PER_REQUEST, parse_proof_request, validate_proof_request
from nexus.config import Settings
from nexus.queueing.routing import Requirements, route_for, vram_thresholds

TINY = {"kind": "poc", "nonce_end": 1000, "options": {"preset": "tiny"}}


def test_a_minimal_request_is_normalised_with_everything_it_will_prove():
    payload = validate_proof_request(TINY, draw_seed=lambda: "drawn")
    assert payload["seed"] == "drawn" and payload["nonce_start"] == 0 and payload["segment_size"] == 256
    assert payload["parameters"]["preset"] == "tiny" and payload["parameters"]["r_target"] < 2 ** 0.5
    assert payload["verification"]["sample_size"] == 64 and payload["allow_cpu"] is False
    assert ProofRequest.from_dict(payload).to_dict() == payload


def test_the_default_preset_is_the_gpu_sized_one():
    assert parse_proof_request({"kind": "poc", "nonce_end": 10}).parameters["preset"] == "standard"


@pytest.mark.parametrize("change, fragment", [
    ({"nonce_start": -5}, "0 <= nonce_start < nonce_end"),
    ({"nonce_start": 10, "nonce_end": 10}, "0 <= nonce_start < nonce_end"),
    ({"nonce_end": 2 ** 60}, "exceeds the largest nonce"),
    ({"nonce_end": MAX_NONCES_PER_REQUEST + 1}, "at most"),
    ({"nonce_end": "10"}, "nonce_end must be an integer"),
    ({"nonce_end": True}, "nonce_end must be an integer"),
    ({"kind": "sha-grinding"}, "unknown proof kind"),
    ({"kind": None}, "kind is required"),
    ({"segment_size": 0}, "segment_size must be between"),
    ({"segment_size": 10 ** 9}, "segment_size must be between"),
    ({"nonce_end": 10_000_000, "segment_size": 1}, "segments of 1 nonces"),
    ({"seed": ""}, "seed must be"),
    ({"seed": "x" * 500}, "seed must be"),
    ({"allow_cpu": "yes"}, "allow_cpu"),
    ({"tier": "moon"}, "unknown tier"),
    ({"tier": "cpu_only"}, "allow_cpu"),
    ({"preset": "tiny"}, "unknown proof request fields: preset"),
    ({"options": {"preset": "colossal"}}, "unknown poc preset"),
    ({"options": {"layers": 3}}, "unknown poc options"),
    ({"options": {"preset": "tiny", "verification": {"sample_size": 1}}}, "sample_size 1 outside"),
    ({"options": {"preset": "tiny", "verification": {"tolerated_failure_rate": 0.9}}}, "tolerated_failure_rate"),
    ({"options": []}, "options must be a JSON object"),
])
def test_bad_requests_are_refused_with_a_clear_message(change, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_proof_request({**TINY, **change})


def test_not_an_object_is_refused():
    with pytest.raises(ValueError, match="JSON object"):
        parse_proof_request([TINY])


def test_split_tiles_the_range_with_a_short_last_segment():
    request = parse_proof_request({**TINY, "nonce_start": 100, "nonce_end": 1100, "segment_size": 300})
    segments = split_range(request)
    assert [(s.index, s.nonce_start, s.nonce_end) for s in segments] == [
        (0, 100, 400), (1, 400, 700), (2, 700, 1000), (3, 1000, 1100)]


@pytest.mark.parametrize("allow_cpu, tier, queue", [
    (False, None, "gpu_infra"),  # any GPU worker (GPU workers taking lower tiers drain gpu_infra too)
    (True, None, "cpu_only"),
    (True, "gpu_peer", "gpu_peer"),
    (False, "ai_factory", "ai_factory"),
    (True, "cpu_only", "cpu_only"),
])
def test_segments_prefer_gpus_unless_cpu_is_allowed(allow_cpu, tier, queue):
    assert route_for(Requirements.parse(segment_requirements(allow_cpu, tier)), vram_thresholds(Settings())) == queue


def test_segment_and_verify_payloads_are_checked():
    request = parse_proof_request(TINY)
    segment = split_range(request)[0].to_dict()
    proof_id = "6f1c2b9e-7d61-4d44-9a55-2b8f1f8a0c11"
    assert validate_segment({"proof_id": proof_id, "segment": segment})["segment"] == segment
    with pytest.raises(ValueError):
        validate_segment({"proof_id": "not-a-uuid", "segment": segment})
    with pytest.raises(ValueError, match="nonce_start < nonce_end"):
        validate_segment({"proof_id": proof_id, "segment": {**segment, "nonce_end": 0}})
    with pytest.raises(ValueError, match="at most"):
        validate_segment({"proof_id": proof_id, "segment": {**segment, "nonce_end": 10 ** 9}})
    with pytest.raises(ValueError, match="unknown proof kind"):
        validate_segment({"proof_id": proof_id, "segment": {**segment, "kind": "other"}})
    assert validate_verify({"proof_id": proof_id}) == {"proof_id": proof_id, "salt": ""}
    with pytest.raises(ValueError, match="salt"):
        validate_verify({"proof_id": proof_id, "salt": 7})


PLUGIN = '''
from nexus.proofs.poc import PocKind

class EchoKind(PocKind):
    """A third-party kind: the poc steps under another name."""
    name = "echo"

class Impostor(PocKind):
    name = "poc"  # tries to take over the built-in name

not_a_kind = object()
'''


def test_other_packages_register_kinds_through_entry_points(tmp_path, monkeypatch):
    """A real (if tiny) installed distribution on sys.path, found by importlib.metadata."""
    (tmp_path / "echo_proofs.py").write_text(PLUGIN)
    dist = tmp_path / "echo_proofs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-proofs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [nexus.proof_kinds]
        echo = echo_proofs:EchoKind
        poc = echo_proofs:Impostor
        broken = echo_proofs:not_a_kind
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.available_kinds.cache_clear()
    try:
        kinds = registry.available_kinds()
        assert kinds["echo"].name == "echo"
        assert type(kinds["poc"]).__name__ == "PocKind"  # the built-in keeps its name
        assert "broken" not in kinds
        assert parse_proof_request({**TINY, "kind": "echo"}).kind == "echo"
    finally:
        registry.available_kinds.cache_clear()  # the next caller reloads without the plug-in
        sys.modules.pop("echo_proofs", None)
