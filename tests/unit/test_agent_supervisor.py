"""The supervisor over real child processes: restart with backoff, drain with a grace period; worker commands."""

from __future__ import annotations

import sys
import time

import pytest

from nexus.supervisor import ChildSpec, RestartPolicy, Supervisor
from nexus.worker.processes import worker_command, worker_env, worker_specs
from nexus.nodes.tiers import TierThresholds, plan_workers
from nexus.config import Settings
from tests.agent_support import hardware

pytestmark = pytest.mark.timeout(60)


def python(code: str, name: str = "child") -> ChildSpec:
    return ChildSpec(name, (sys.executable, "-c", code))


def poll_until(supervisor: Supervisor, predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, supervisor.status()
        supervisor.poll()
        time.sleep(0.02)


def test_backoff_doubles_up_to_the_cap():
    policy = RestartPolicy(base_seconds=1, max_seconds=5, reset_after_seconds=60)
    assert [policy.delay(n) for n in range(0, 6)] == [0, 1, 2, 4, 5, 5]


def test_a_crashing_child_is_restarted_with_growing_delays():
    supervisor = Supervisor([python("import sys; sys.exit(3)")], RestartPolicy(0.05, 0.4, 60))
    supervisor.start()
    poll_until(supervisor, lambda: supervisor.status()[0]["restarts"] >= 3)
    exits = [e for e in supervisor.events if e.kind == "exited"]
    assert [e.exit_code for e in exits[:3]] == [3, 3, 3]
    assert [e.restart_in for e in exits[:3]] == [0.05, 0.1, 0.2]
    supervisor.stop(grace_seconds=1)
    assert not supervisor.running and supervisor.status()[0]["running"] is False


def test_stop_waits_for_a_clean_exit_and_kills_a_stubborn_child():
    polite = python("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
                    "print('up', flush=True); time.sleep(60)", "polite")
    stubborn = python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('up', flush=True); time.sleep(60)", "stubborn")
    supervisor = Supervisor([polite, stubborn], RestartPolicy(0.05, 1, 60))
    supervisor.start()
    time.sleep(0.5)  # let both install their handlers
    started = time.monotonic()
    supervisor.stop(grace_seconds=1.0)
    assert 0.9 <= time.monotonic() - started < 5
    assert [e.name for e in supervisor.events if e.kind == "killed"] == ["stubborn"]
    assert {s["name"]: s["last_exit_code"] for s in supervisor.status()} == {"polite": 0, "stubborn": -9}
    supervisor.poll()  # stopped children are not restarted
    assert not any(s["running"] for s in supervisor.status())


def test_gpu_workers_use_the_solo_pool_and_see_only_their_gpu():
    settings = Settings(worker_pool="threads", worker_concurrency=6)
    plans = plan_workers(hardware("mixed_4090_3060"), TierThresholds.from_settings(settings), False)
    specs = worker_specs(plans, "node-1", "mixed", settings, {"PATH": "/bin"})
    assert [s.name for s in specs] == ["gpu0", "gpu1"]
    for spec, gpu, queue in zip(specs, ("0", "1"), ("gpu_peer", "gpu_infra"), strict=True):
        argv = list(spec.argv)
        assert argv[argv.index("--pool") + 1] == "solo" and argv[argv.index("--concurrency") + 1] == "1"
        assert argv[argv.index("--queues") + 1] == queue
        assert spec.env["CUDA_VISIBLE_DEVICES"] == gpu and spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert spec.env["NEXUS_NODE_NAME"] == "mixed" and spec.env["PATH"] == "/bin"


def test_a_cpu_worker_hides_every_gpu_and_uses_the_configured_pool():
    settings = Settings(worker_pool="threads", worker_concurrency=6)
    argv = worker_command("node-1", None, ["cpu_only"], settings)
    assert argv[argv.index("--pool") + 1] == "threads" and argv[argv.index("--concurrency") + 1] == "6"
    assert worker_env({}, None, "node-1", "n", "cpu_only")["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ValueError):
        worker_command("node-1", None, [], settings)


def test_a_guarded_worker_stops_when_its_agent_is_killed(tmp_path):
    """SIGKILL the 'agent'; its guarded child gets SIGTERM from the kernel instead of running on."""
    import os
    import signal
    import subprocess

    import psutil

    marker = tmp_path / "child.pid"
    child = (f"import os, pathlib, time; pathlib.Path({str(marker)!r}).write_text(str(os.getpid())); "
             "time.sleep(60)")
    agent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-m', 'nexus.agent.orphan_guard', "
             f"sys.executable, '-c', {child!r}]); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", agent], start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker = psutil.Process(int(marker.read_text()))
        assert worker.ppid() == parent.pid  # the guard exec'd into the command: no extra process
        parent.kill()
        parent.wait()
        worker.wait(timeout=10)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
