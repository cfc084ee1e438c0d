"""Pure pieces of the agent: state rules, the master's answers, the heartbeat loop, can-fit, failures, identity."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from nexus.jobs import failures
from nexus.activity import ActivityBoard
from nexus.nodes.fit import GpuView, NodeView, Reservation, can_fit
from nexus.agent.heartbeat import HeartbeatLoop, heartbeat_body
from nexus.agent.identity import NodeIdentity, identity_path, load_identity, save_identity
from nexus.agent.master import (BadRequest, HeartbeatReply, MasterUnavailable, NodeRevoked, RegistrationRefused,
                                heartbeat_reply, interpret)
from nexus.nodes.states import (ALLOWED_TRANSITIONS, InvalidNodeTransition, NodeState, liveness_state,
                                state_on_heartbeat, transition)
from nexus.queueing.tiers import Tier
from tests.agent_support import hardware

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


# --- states ---------------------------------------------------------------------------------------

def test_removed_is_terminal_and_every_state_has_its_row():
    assert set(ALLOWED_TRANSITIONS) == set(NodeState)
    assert ALLOWED_TRANSITIONS[NodeState.REMOVED] == frozenset()
    with pytest.raises(InvalidNodeTransition, match="removed to ready"):
        transition(NodeState.REMOVED, NodeState.READY)
    assert all(NodeState.REMOVED in targets for state, targets in ALLOWED_TRANSITIONS.items()
               if state is not NodeState.REMOVED)


def test_quarantine_is_left_only_through_an_admin():
    assert ALLOWED_TRANSITIONS[NodeState.QUARANTINED] == {NodeState.READY, NodeState.REMOVED}
    assert state_on_heartbeat(NodeState.QUARANTINED, drain_requested=False) is NodeState.QUARANTINED
    assert liveness_state(NodeState.QUARANTINED, 10_000, 20, 60) is None


@pytest.mark.parametrize("current", list(NodeState))
@pytest.mark.parametrize("age", [0, 25, 65])
def test_liveness_only_moves_along_allowed_transitions(current, age):
    target = liveness_state(current, age, 20, 60)
    assert target is None or target in ALLOWED_TRANSITIONS[current]


@pytest.mark.parametrize("current", [s for s in NodeState if s is not NodeState.REMOVED])
@pytest.mark.parametrize("drain", [False, True])
def test_heartbeats_only_move_along_allowed_transitions(current, drain):
    target = state_on_heartbeat(current, drain)
    assert target is current or target in ALLOWED_TRANSITIONS[current]


# --- the master's answers -----------------------------------------------------------------------------

@pytest.mark.parametrize("status,during,error", [
    (401, "register", RegistrationRefused), (403, "register", RegistrationRefused),
    (401, "heartbeat", NodeRevoked), (404, "heartbeat", NodeRevoked),
    (503, "heartbeat", MasterUnavailable), (429, "register", MasterUnavailable),
    (400, "heartbeat", BadRequest), (409, "register", BadRequest),
])
def test_interpret_maps_statuses(status, during, error):
    with pytest.raises(error, match="the message"):
        interpret(status, {"error": {"code": "x", "message": "the message"}}, during)


def test_heartbeat_reply_says_whether_to_work():
    assert heartbeat_reply({"state": "ready"}).should_work
    assert not heartbeat_reply({"state": "ready", "drain_requested": True}).should_work
    assert not heartbeat_reply({"state": "quarantined"}).should_work
    assert heartbeat_reply({"state": "ready", "max_concurrent": 3}).max_concurrent == 3
    with pytest.raises(BadRequest):
        heartbeat_reply({})


def test_heartbeat_loop_survives_an_unreachable_master_and_stops_when_revoked():
    answers = iter([MasterUnavailable("down"), HeartbeatReply("ready"), NodeRevoked("removed")])
    seen = []

    def send(body):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    loop = HeartbeatLoop(lambda: {"state": "ready"}, send, interval_seconds=0.01, on_reply=seen.append)
    assert loop.run(threading.Event()) == "revoked"
    assert (loop.sent, loop.failed, seen) == (1, 1, [HeartbeatReply("ready")])


def test_heartbeat_body_carries_the_changing_resources():
    body = heartbeat_body(hardware("mixed_4090_3060"), state="ready", running_jobs=["a"], loaded_models=[],
                          workers=[{"name": "gpu0"}], cpu_percent=3.0, sent_at=1.0)
    assert [g["memory_free_mb"] for g in body["resources"]["gpus"]] == [20011, 12001]
    assert body["running_jobs"] == ["a"] and "hardware" not in body


# --- can-fit ----------------------------------------------------------------------------------------------

def node(node_id, tier, free, state=NodeState.READY):
    return NodeView(node_id, state, tier, tuple(GpuView(i, tier, 24_000, f) for i, f in enumerate(free)))


def test_can_fit_prefers_the_least_capable_tier_then_most_free():
    fleet = [node("h100", Tier.AI_FACTORY, [80_000]), node("a", Tier.GPU_PEER, [20_000]),
             node("b", Tier.GPU_PEER, [23_000]), node("gone", Tier.GPU_PEER, [24_000], NodeState.OFFLINE)]
    assert [f.node_id for f in can_fit(fleet, 16_000, 1, None, [], NOW)] == ["b", "a", "h100"]
    assert [f.node_id for f in can_fit(fleet, 16_000, 1, Tier.AI_FACTORY, [], NOW)] == ["h100"]


def test_can_fit_subtracts_live_reservations_only():
    fleet = [node("a", Tier.GPU_PEER, [20_000, 20_000])]
    live = Reservation("r1", "a", 0, 10_000, NOW + timedelta(minutes=5))
    expired = Reservation("r2", "a", 1, 10_000, NOW - timedelta(seconds=1))
    [fit] = can_fit(fleet, 15_000, 1, None, [live, expired], NOW)
    assert [g.index for g in fit.gpus] == [1] and fit.chosen == (1,)
    assert can_fit(fleet, 15_000, 2, None, [live], NOW) == []
    with pytest.raises(ValueError):
        can_fit(fleet, 1, 0, None, [], NOW)


# --- failures -----------------------------------------------------------------------------------------------

def test_retry_placement():
    assert failures.nodes_for_retry(["a", "b"], {"a"}) == ["b"]
    assert failures.nodes_for_retry(["a"], {"a"}) == ["a"]  # better a repeat than no run
    assert not failures.may_claim("a", {"a"}, ["a", "b"]) and failures.may_claim("a", {"a"}, ["a"])


# --- identity and activity -------------------------------------------------------------------------------------

def test_identity_is_private_and_bound_to_its_master(tmp_path):
    identity = NodeIdentity("id-1", "n1", "nxn_secret", "http://master:8000")
    path = save_identity(tmp_path, identity)
    assert path == identity_path(tmp_path) and (path.stat().st_mode & 0o777) == 0o600
    assert load_identity(tmp_path, "http://master:8000/") == identity
    assert load_identity(tmp_path, "http://other:8000") is None
    path.write_text("{")
    with pytest.raises(ValueError, match="delete it to register again"):
        load_identity(tmp_path, "http://master:8000")


def test_activity_board_forgets_dead_processes(tmp_path):
    board, dead = ActivityBoard(tmp_path), ActivityBoard(tmp_path, pid=2**22 + 12345)
    with board.running_job("job-1"):
        dead.job_started("job-ghost")
        board.model_loaded("tiny")
        assert board.running_jobs() == ["job-1"] and board.loaded_models() == ["tiny"]
    assert board.running_jobs() == [] and not list(tmp_path.glob("job-*"))
