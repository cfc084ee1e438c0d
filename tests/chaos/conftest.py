"""Fixtures of the chaos suite: one isolated cluster for the run, and two profiles.

    python -m pytest -m chaos tests/chaos           the short profile (CI)
    python -m pytest -m soak tests/chaos            the soak profile: more jobs, more faults, repeated

Each test prints its counts; the terminal summary lists them all at the end.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass

import pytest

from tests.chaos.audit import Report
from tests.chaos.cluster import ChaosCluster

_REPORTS: list[Report] = []


@dataclass(frozen=True)
class Profile:
    name: str
    jobs: int  # jobs in each test's stream
    kills: int  # SIGKILLs of workers in the repeated-kill test
    repeats: int  # how often the one-off faults (restarts, freezes, drains) are repeated within a stream
    per_second: float  # submission rate of the stream


PROFILES = {
    "short": Profile("short", jobs=300, kills=20, repeats=1, per_second=30.0),
    "soak": Profile("soak", jobs=2000, kills=120, repeats=4, per_second=30.0),
}


@pytest.fixture(params=[pytest.param("short"), pytest.param("soak", marks=pytest.mark.soak)])
def profile(request) -> Profile:
    return PROFILES[request.param]


@pytest.fixture(scope="session")
def chaos_cluster(tmp_path_factory):
    # The cluster's processes run in sessions of their own (the faults signal them by group), so a
    # SIGTERM to pytest (CI timeouts, `timeout`) would leave them behind: make it unwind like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    cluster = ChaosCluster(tmp_path_factory.mktemp("chaos"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(*_):
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture
def cluster(chaos_cluster) -> ChaosCluster:
    """The run's cluster with every part up again (a failed test may have left one down)."""
    chaos_cluster.ensure_running()
    return chaos_cluster


@pytest.fixture
def report():
    """Call with a Report: printed now, listed in the terminal summary, appended to NEXUS_CHAOS_REPORT if set."""
    def record(result: Report) -> Report:
        _REPORTS.append(result)
        print("CHAOS", result.line(), flush=True)
        path = os.environ.get("NEXUS_CHAOS_REPORT")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps(result.as_dict()) + "\n")
        return result

    return record


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("chaos: jobs and recovery per fault")
        for result in _REPORTS:
            terminalreporter.write_line(result.line())
