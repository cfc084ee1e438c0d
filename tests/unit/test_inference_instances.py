"""What an agent runs for the instances placed on its node (pure)."""

from __future__ import annotations

from nexus.config import Settings
from nexus.models.instances import child_name, reconcile
from nexus.worker.processes import instance_child
from nexus.models.placement import ParallelismPlan, Stage, Strategy


def instance(id_: str, model: str = "llama", plan: ParallelismPlan | None = None) -> dict:
    plan = plan or ParallelismPlan(Strategy.TENSOR_PARALLEL, 2, 1, (Stage("node-a", (2, 3)),), 40_000)
    return {"id": id_, "model": model, "plan": plan.to_dict(), "gpus": list(plan.head.gpus)}


def test_reconcile_starts_the_new_and_stops_the_gone():
    a, b = instance("a"), instance("b")
    start, stop = reconcile([a, b], {child_name(a), "model-old", "cpu"})
    assert start == [(b, "model-b")] and stop == ["model-old"]  # tier workers ("cpu") are not the instances' business
    assert reconcile([], []) == ([], [])


def test_an_instance_worker_serves_only_its_model_on_its_gpus():
    child = instance_child(instance("i-1"), "node-a", "box-1", Settings(), {"PATH": "/bin"}, concurrency=6)
    assert child.name == "model-i-1"
    argv = list(child.argv)
    assert argv[1:3] == ["-m", "nexus.agent.orphan_guard"]  # stops with the agent, even a killed one
    assert argv[4:7] == ["-m", "nexus", "worker"]
    assert argv[argv.index("--queues") + 1] == "model.llama,node.box-1.model.llama"
    assert argv[argv.index("--model") + 1] == "llama"
    assert child.env["CUDA_VISIBLE_DEVICES"] == "2,3" and child.env["NEXUS_WORKER_INSTANCE_ID"] == "i-1"
    assert child.env["NEXUS_NODE_ID"] == "node-a" and child.env["PATH"] == "/bin"
    # The node's max_concurrent: requests in flight, and as many threads to carry them.
    assert child.env["NEXUS_INFERENCE_CONCURRENCY"] == child.env["NEXUS_WORKER_CONCURRENCY"] == "6"
    assert "NEXUS_INFERENCE_CONCURRENCY" not in instance_child(instance("i-1"), "node-a", "b", Settings(), {}).env


def test_a_pipeline_stage_on_this_node_gets_this_nodes_gpus():
    plan = ParallelismPlan(Strategy.HYBRID_TP_PP, 2, 2, (Stage("node-a", (0, 1)), Stage("node-b", (4, 5))), 1)
    assert instance_child(instance("i", plan=plan), "node-b", "b", Settings(), {}).env["CUDA_VISIBLE_DEVICES"] == "4,5"
