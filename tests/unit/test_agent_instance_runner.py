"""The agent's instance loop over real child processes: start the new, stop the gone, restart on a new
max_concurrent, stop everything on a drain and resume after; and the heartbeat answer it follows."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from nexus.agent.instance_runner import InstanceRunner
from nexus.agent.master import BadRequest, HeartbeatReply, heartbeat_reply
from nexus.supervisor import ChildSpec, RestartPolicy, Supervisor
from nexus.config import Settings

pytestmark = pytest.mark.timeout(60)


def sleeper(spec: ChildSpec) -> subprocess.Popen:
    """Stands in for the serving worker: a real process that stops on SIGTERM."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(spec.env or {}))


def order(id_: str, model: str = "tiny") -> dict:
    return {"id": id_, "model": model, "plan": {"strategy": "cpu", "stages": [{"node_id": "node-a", "gpus": []}]},
            "gpus": []}


def ready(*orders: dict, max_concurrent: int | None = None) -> HeartbeatReply:
    return HeartbeatReply("ready", max_concurrent=max_concurrent, instances=tuple(orders))


@pytest.fixture
def runner():
    supervisor = Supervisor([], RestartPolicy(0.05, 1, 60), spawn=sleeper)
    runner = InstanceRunner("node-a", "box-a", Settings(agent_drain_grace_seconds=2), {"PATH": "/usr/bin"},
                            RestartPolicy(), supervisor=supervisor)
    yield runner
    runner.stop(1)


def pids(runner: InstanceRunner) -> dict[str, int]:
    return {s["instance_id"]: s["pid"] for s in runner.status() if s["running"]}


def test_instances_come_and_go_with_the_masters_answer(runner):
    runner.follow(None, 8)  # no answer yet: nothing starts
    assert runner.status() == []
    runner.follow(ready(order("a")), 8)
    [status] = runner.status()
    assert status["name"] == "model-a" and status["instance_id"] == "a" and status["model"] == "tiny"
    assert runner.supervisor.children["model-a"].env["NEXUS_INFERENCE_CONCURRENCY"] == "8"
    first = pids(runner)["a"]

    runner.follow(ready(order("a"), order("b", "other")), 8)
    assert pids(runner).keys() == {"a", "b"} and pids(runner)["a"] == first  # a keeps running

    runner.follow(ready(order("b", "other")), 8)
    assert pids(runner).keys() == {"b"}
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # a's worker was stopped, not only forgotten

    runner.follow(HeartbeatReply("ready", instances=None), 8)  # the master said nothing of instances
    assert pids(runner).keys() == {"b"}


def test_a_new_max_concurrent_restarts_the_workers_with_it(runner):
    runner.follow(ready(order("a")), 16)
    before = pids(runner)["a"]
    runner.follow(ready(order("a"), max_concurrent=4), 4)
    assert pids(runner)["a"] != before
    assert runner.supervisor.children["model-a"].env["NEXUS_INFERENCE_CONCURRENCY"] == "4"


def test_a_drain_stops_the_instances_and_ready_brings_them_back(runner):
    runner.follow(ready(order("a")), 8)
    runner.follow(HeartbeatReply("draining", drain_requested=True, instances=(order("a"),)), 8)
    assert pids(runner) == {} and [s["instance_id"] for s in runner.status()] == ["a"]
    runner.follow(ready(order("a")), 8)
    assert pids(runner).keys() == {"a"}


def test_a_crashed_instance_worker_restarts_with_backoff_not_at_every_pass(runner):
    runner.follow(ready(order("a")), 8)
    runner.supervisor._children[0].process.kill()
    runner.supervisor._children[0].process.wait()
    runner.poll()  # reaped: restart scheduled after the backoff
    runner.follow(ready(order("a")), 8)  # the next pass must not start it early
    assert pids(runner) == {}
    time.sleep(0.1)
    runner.poll()
    assert pids(runner).keys() == {"a"}


def test_the_heartbeat_answer_carries_the_instances():
    assert heartbeat_reply({"state": "ready"}).instances is None
    reply = heartbeat_reply({"state": "ready", "instances": [order("a")]})
    assert reply.instances == (order("a"),)
    with pytest.raises(BadRequest):
        heartbeat_reply({"state": "ready", "instances": [{"model": "tiny"}]})


def test_the_supervisor_adds_and_removes_children():
    supervisor = Supervisor([], RestartPolicy(0.05, 1, 60), spawn=sleeper)
    supervisor.add(ChildSpec("x", ("x",)))  # stopped supervisor: added, not started
    assert supervisor.status()[0]["running"] is False
    supervisor.start()
    supervisor.add(ChildSpec("y", ("y",)))
    assert all(s["running"] for s in supervisor.status())
    with pytest.raises(ValueError):
        supervisor.add(ChildSpec("y", ("y",)))
    supervisor.remove(["x"], grace_seconds=2)
    assert list(supervisor.children) == ["y"]
    supervisor.stop(2)
    assert not any(s["running"] for s in supervisor.status())
