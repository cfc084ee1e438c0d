"""Placement over the hardware fixtures: which GPUs, which parallelism plan, and when nothing fits."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from nexus.nodes.fit import GpuView, NodeView, Reservation
from nexus.nodes.hardware import NodeHardware
from nexus.nodes.states import NodeState
from nexus.nodes.tiers import TierThresholds, classify_node, gpu_tiers
from nexus.config import Settings
from nexus.models.placement import (ParallelismPlan, PlacementError, PlacementRequest, Stage, Strategy,
                                       candidate_sizes, pending_reservations, place)
from nexus.queueing.tiers import Tier

FIXTURES = Path(__file__).parent.parent / "fixtures" / "hardware"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
THRESHOLDS = TierThresholds.from_settings(Settings())


def node(fixture: str, node_id: str | None = None, state: NodeState = NodeState.READY) -> NodeView:
    """A NodeView as the master builds it from a registered node's hardware."""
    hardware = NodeHardware.from_dict(json.loads((FIXTURES / f"{fixture}.json").read_text()))
    tiers = gpu_tiers(hardware, THRESHOLDS)
    gpus = tuple(GpuView(g.index, tiers[g.index], g.memory_total_mb, g.memory_free_mb) for g in hardware.gpus)
    return NodeView(node_id or fixture, state, classify_node(hardware, THRESHOLDS), gpus)


def plan_for(vram_mb: int, nodes, tier: Tier = Tier.CPU_ONLY, reservations=(), **sizes) -> ParallelismPlan:
    return place(PlacementRequest(vram_mb, tier, **sizes), nodes, reservations, NOW)


def test_a_model_that_fits_one_gpu_takes_one_gpu():
    plan = plan_for(14_000, [node("rtx4090")])
    assert plan.strategy is Strategy.SINGLE_GPU
    assert plan.stages == (Stage("rtx4090", (0,)),)
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.per_gpu_mb) == (1, 1, 14_000)


def test_small_models_go_to_the_least_capable_gpu_that_fits():
    plan = plan_for(10_000, [node("h100x8"), node("rtx3060"), node("rtx4090")])
    assert plan.head.node_id == "rtx3060"


def test_a_model_larger_than_one_h100_is_tensor_parallel_on_one_node():
    nodes = [node("h100x8")]
    two = plan_for(140_000, nodes)
    assert two.strategy is Strategy.TENSOR_PARALLEL and two.tensor_parallel_size == 2
    assert len(two.head.gpus) == 2 and two.per_gpu_mb == 70_000
    four = plan_for(300_000, nodes)
    assert (four.strategy, four.tensor_parallel_size, len(four.head.gpus)) == (Strategy.TENSOR_PARALLEL, 4, 4)


def test_a_model_larger_than_a_node_is_tensor_parallel_inside_and_pipelined_across_nodes():
    plan = plan_for(1_000_000, [node("h100x8", "dgx-a"), node("h100x8", "dgx-b")])
    assert plan.strategy is Strategy.HYBRID_TP_PP
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size) == (8, 2)
    assert [s.node_id for s in plan.stages] == ["dgx-a", "dgx-b"] or [s.node_id for s in plan.stages] == ["dgx-b",
                                                                                                        "dgx-a"]
    assert all(len(s.gpus) == 8 for s in plan.stages) and plan.multi_node


def test_one_gpu_per_node_gives_pipeline_parallel_across_nodes():
    plan = plan_for(40_000, [node("rtx4090", "peer-a"), node("rtx4090", "peer-b")])
    assert plan.strategy is Strategy.PIPELINE_PARALLEL
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size) == (1, 2)
    assert {s.node_id for s in plan.stages} == {"peer-a", "peer-b"}


def test_two_gpu_boxes_pair_up_as_tensor_parallel_stages():
    plan = plan_for(80_000, [node("rtx3090x2", "box-a"), node("rtx3090x2", "box-b")])
    assert plan.strategy is Strategy.HYBRID_TP_PP
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size) == (2, 2)


def test_three_gpus_on_one_node_are_pipeline_stages_not_tensor_parallel():
    gpus = tuple(GpuView(i, Tier.GPU_PEER, 24_564, 24_000) for i in range(3))
    plan = plan_for(60_000, [NodeView("three", NodeState.READY, Tier.GPU_PEER, gpus)])
    assert plan.strategy is Strategy.PIPELINE_PARALLEL and plan.pipeline_parallel_size == 3
    assert [s.gpus for s in plan.stages] == [(0,), (1,), (2,)] and not plan.multi_node


def test_fixed_sizes_are_honoured():
    plan = plan_for(20_000, [node("h100x8")], tensor_parallel_size=4)
    assert (plan.strategy, plan.tensor_parallel_size, plan.per_gpu_mb) == (Strategy.TENSOR_PARALLEL, 4, 5_000)
    with pytest.raises(PlacementError, match="tensor_parallel_size=8"):
        plan_for(20_000, [node("rtx3090x2")], tensor_parallel_size=8)


def test_nothing_fits_says_why():
    with pytest.raises(PlacementError, match="no GPUs can hold 14000 MB .largest free GPU: 11902 MB"):
        plan_for(14_000, [node("rtx3060")])
    with pytest.raises(PlacementError, match="no ready node"):
        plan_for(14_000, [node("rtx4090", state=NodeState.DRAINING)])


def test_min_tier_keeps_models_off_smaller_classes():
    with pytest.raises(PlacementError):
        plan_for(10_000, [node("mixed_4090_3060")], tier=Tier.AI_FACTORY)
    plan = plan_for(10_000, [node("mixed_4090_3060")], tier=Tier.GPU_PEER)
    assert plan.stages == (Stage("mixed_4090_3060", (0,)),)  # the 4090, not the 3060


def test_old_and_cpu_only_nodes_never_get_gpu_work():
    with pytest.raises(PlacementError):
        plan_for(1_000, [node("gtx1060_legacy"), node("cpu_only")])


def test_reservations_take_vram_away():
    hold = Reservation("r1", "rtx4090", 0, 10_000, NOW + timedelta(minutes=5))
    with pytest.raises(PlacementError):
        plan_for(14_000, [node("rtx4090")], reservations=[hold])
    expired = Reservation("r2", "rtx4090", 0, 10_000, NOW - timedelta(seconds=1))
    assert plan_for(14_000, [node("rtx4090")], reservations=[expired]).strategy is Strategy.SINGLE_GPU


def test_pending_instances_reserve_what_they_were_given():
    first = plan_for(60_000, [node("h100x8")])
    instances = [{"id": "i1", "state": "pending", "plan": first.to_dict()},
                 {"id": "i2", "state": "running", "plan": first.to_dict()}]  # running: visible in free VRAM already
    held = pending_reservations(instances, NOW + timedelta(minutes=30))
    assert [(r.node_id, r.gpu_index, r.memory_mb) for r in held] == [("h100x8", first.head.gpus[0], 60_000)]
    second = plan_for(60_000, [node("h100x8")], reservations=held)
    assert second.head.gpus != first.head.gpus


def test_gpu_memory_utilization_leaves_room_for_what_others_use():
    assert plan_for(14_000, [node("rtx4090")]).gpu_memory_utilization == 0.90
    shared = plan_for(14_000, [node("mixed_4090_3060")], tier=Tier.GPU_PEER)  # 20011 of 24564 MB free
    assert shared.gpu_memory_utilization == 0.81


def test_cpu_models_go_to_the_least_capable_node_or_wait_unplaced():
    plan = plan_for(0, [node("h100x8"), node("cpu_only")])
    assert plan.strategy is Strategy.CPU and plan.head.node_id == "cpu_only"
    assert plan_for(0, []).stages == ()


def test_a_cpu_model_deployed_to_named_nodes_goes_there_or_is_refused():
    nodes = [node("h100x8"), node("cpu_only"), node("rtx3060", state=NodeState.DRAINING)]
    plan = place(PlacementRequest(0, node_ids=frozenset({"h100x8"})), nodes, (), NOW)
    assert plan.head.node_id == "h100x8"
    with pytest.raises(PlacementError, match="no ready node"):  # never silently left unplaced
        place(PlacementRequest(0, node_ids=frozenset({"rtx3060"})), nodes, (), NOW)


def test_candidates_try_fewest_gpus_then_fewest_stages():
    sizes = candidate_sizes(PlacementRequest(1))
    assert sizes[:5] == [(1, 1), (2, 1), (1, 2), (1, 3), (4, 1)]
    assert sizes.index((8, 2)) < sizes.index((4, 8))


def test_plans_survive_a_round_trip_through_json():
    plan = plan_for(1_000_000, [node("h100x8", "a"), node("h100x8", "b")])
    assert ParallelismPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
