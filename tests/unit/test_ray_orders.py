"""Multi-node instances on Ray, the pure parts: port blocks, what each member is told, what the agent runs
for it (the `ray start` command line checked against Ray 2.60's options), and the token kept off the API."""

from __future__ import annotations

import click
import pytest
from ray.scripts.scripts import start as ray_start_cli

from nexus.agent.ray_node import ray_child, ray_start_command, serving_env, temp_dir
from nexus.config import Settings
from nexus.models.catalog import instance_view
from nexus.models.instances import reconcile
from nexus.models.placement import ParallelismPlan, Stage, Strategy
from nexus.models.placement import MAX_PIPELINE_STAGES
from nexus.models.ray_clusters import PORT_BLOCK, RayCluster, RayOrder, RayPorts, plan_record, ray_order

TOKEN = "t" * 64
PLAN = ParallelismPlan(Strategy.HYBRID_TP_PP, 2, 2, (Stage("node-a", (0, 1)), Stage("node-b", (4, 5))), 30_000)


def row(plan: ParallelismPlan = PLAN, port_base: int = 30_100) -> dict:
    return {"id": "0123456789abcdef", "model": "big", "node_id": "node-a",
            "plan": plan_record(plan, RayCluster(port_base, TOKEN)), "state": "pending", "gpus": [0, 1],
            "worker": None, "error": None, "heartbeat_at": None, "created_at": None, "updated_at": None}


def order_for(node: str, head_address: str = "10.0.0.1") -> dict:
    ray = ray_order(row(), node, head_address)
    return {"id": "0123456789abcdef", "model": "big", "plan": PLAN.to_dict(), "gpus": list(ray.gpus),
            "ray": ray.to_dict()}


def test_each_member_is_told_its_role_its_gpus_and_the_heads_address():
    head, member = ray_order(row(), "node-a", "10.0.0.1"), ray_order(row(), "node-b", "10.0.0.1")
    assert (head.role, head.gpus, head.nodes) == ("head", (0, 1), 2)
    assert (member.role, member.gpus, member.gcs_address) == ("member", (4, 5), "10.0.0.1:30100")
    assert (head.member, member.member) == (0, 1)
    last = RayPorts(30_100, MAX_PIPELINE_STAGES - 1)  # the eighth member's ports still fit the block
    assert last.max_worker == 30_100 + PORT_BLOCK - 1
    assert head.token == member.token == TOKEN
    single = {"node_id": "node-a", "plan": PLAN.to_dict()}
    assert ray_order(single, "node-a", "10.0.0.1") is None  # one node: no Ray cluster


def test_the_api_never_shows_the_token():
    view = instance_view(row())
    assert view["plan"]["ray"] == {"port_base": 30_100} and TOKEN not in str(view)


def test_the_head_runs_ray_and_the_server_a_member_only_ray():
    start, _ = reconcile([order_for("node-a")], [])
    assert [name for _, name in start] == ["ray-0123456789abcdef", "model-0123456789abcdef"]
    start, _ = reconcile([order_for("node-b")], [])
    assert [name for _, name in start] == ["ray-0123456789abcdef"]
    start, _ = reconcile([order_for("node-b", head_address="")], [])
    assert start == []  # the head has not said where it is: nothing to join yet
    _, stop = reconcile([], ["ray-gone", "model-gone", "cpu"])
    assert stop == ["model-gone", "ray-gone"]


def parse_ray_start(argv: list[str]) -> dict:
    """Ray's own `ray start` parser (click): an unknown option or a bad value fails here."""
    assert argv[:2] == ["ray", "start"]
    context = ray_start_cli.make_context("start", argv[2:])
    return context.params


def test_the_ray_start_command_lines_are_what_ray_parses():
    settings = Settings(ray_temp_root="/tmp/nexus-ray")
    head = RayOrder.from_dict(order_for("node-a")["ray"])
    params = parse_ray_start(ray_start_command(head, "10.0.0.1", temp_dir(settings, "0123456789abcdef", "node-a")))
    assert params["head"] and params["block"] and params["port"] == 30_100 and params["num_gpus"] == 2
    assert params["node_ip_address"] == "10.0.0.1" and params["temp_dir"] == "/tmp/nexus-ray/01234567-node-a"
    assert (params["node_manager_port"], params["object_manager_port"]) == (30_108, 30_109)
    assert (params["min_worker_port"], params["max_worker_port"]) == (30_114, 30_131)
    assert params["include_dashboard"] is False
    member = RayOrder.from_dict(order_for("node-b")["ray"])
    params = parse_ray_start(ray_start_command(member, "10.0.0.2", temp_dir(settings, "0123456789abcdef", "node-b")))
    assert not params["head"] and params["address"] == "10.0.0.1:30100" and params["num_gpus"] == 2
    assert params["node_manager_port"] == 30_132 and params["object_manager_port"] == 30_133  # its own ports
    assert params["max_worker_port"] == 30_155 < 30_100 + PORT_BLOCK
    with pytest.raises(click.UsageError):
        parse_ray_start(["ray", "start", "--no-such-option"])


def test_the_ray_child_keeps_the_token_off_its_command_line():
    child = ray_child(order_for("node-b"), "node-b", Settings(ray_temp_root="/tmp/nexus-ray-test"), {"PATH": "/bin"},
                      "10.0.0.2")
    assert TOKEN not in " ".join(child.argv) and child.kill_group
    assert child.argv[1:3] == ("-m", "nexus.agent.orphan_guard")  # stops with the agent, even a killed one
    assert child.env["RAY_AUTH_MODE"] == "token" and child.env["RAY_AUTH_TOKEN"] == TOKEN
    assert child.env["CUDA_VISIBLE_DEVICES"] == "4,5" and child.env["VLLM_HOST_IP"] == "10.0.0.2"
    env = serving_env(RayOrder.from_dict(order_for("node-a")["ray"]), "10.0.0.1")
    assert env["RAY_ADDRESS"] == "10.0.0.1:30100" and env["VLLM_HOST_IP"] == "10.0.0.1"
