"""Pure logic of the job platform: the state machine, routing, backoff and request validation."""

from __future__ import annotations

import random

import pytest

from nexus.config import Settings
from nexus.jobs.lifecycle import backoff_seconds
from nexus.jobs.states import (ACTIVE_STATES, CLAIMABLE_STATES, FINAL_STATES, RETRYABLE_BY_HAND, TRANSITIONS,
                                InvalidTransition, JobState, check_transition, sources_of, sql_in)
from nexus.jobs.submit import SubmissionError, build_spec
from nexus.queueing.routing import Requirements, route_for, vram_thresholds
from nexus.queueing.tiers import Tier, queues_for_worker


def test_the_written_down_transitions():
    assert TRANSITIONS[JobState.QUEUED] == {JobState.RUNNING, JobState.CANCELLED}
    assert JobState.RETRYING in TRANSITIONS[JobState.RUNNING]
    assert JobState.RUNNING in TRANSITIONS[JobState.RETRYING]
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()  # success is forever
    check_transition(JobState.QUEUED, JobState.RUNNING)
    with pytest.raises(InvalidTransition, match="a succeeded job cannot become running"):
        check_transition(JobState.SUCCEEDED, JobState.RUNNING)
    assert set(sources_of(JobState.RUNNING)) == {"queued", "retrying"}


def test_sql_state_guards_are_read_off_the_transition_table():
    assert sql_in("j.state", CLAIMABLE_STATES) == "j.state IN ('queued', 'retrying')"
    assert sql_in("state", ACTIVE_STATES) == "state IN ('queued', 'running', 'retrying')"
    assert sql_in("j.state", RETRYABLE_BY_HAND) == "j.state IN ('failed', 'cancelled')"
    with pytest.raises(ValueError):
        sql_in("state", [])
    assert all(s.is_final for s in FINAL_STATES) and not JobState.RUNNING.is_final


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(7)
    delays = [backoff_seconds(attempt, base=1.0, cap=30.0, rng=rng) for attempt in range(1, 10)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(30.0, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0


@pytest.mark.parametrize("requirements, queue", [
    ({}, "cpu_only"),
    ({"tier": "gpu_peer"}, "gpu_peer"),
    ({"gpu": True}, "gpu_infra"),
    ({"min_vram_mb": 16_000}, "gpu_infra"),
    ({"min_vram_mb": 24_000}, "gpu_peer"),
    ({"min_vram_mb": 80_000}, "ai_factory"),
    ({"model": "tiny-llama", "tier": "gpu_peer"}, "model.tiny-llama"),
])
def test_routing_is_a_pure_function_of_requirements(requirements, queue):
    assert route_for(Requirements.parse(requirements), vram_thresholds(Settings())) == queue


@pytest.mark.parametrize("min_vram_mb, queue", [(6_000, "gpu_infra"), (12_000, "gpu_peer"), (30_000, "ai_factory")])
def test_routing_follows_the_tier_thresholds_nodes_are_tiered_by(monkeypatch, min_vram_mb, queue):
    """Nodes are tiered by NEXUS_TIER_*_MIN_VRAM_MB; a job needing N MB must go to the tier whose
    GPUs are guaranteed N MB under those same thresholds, not under numbers of its own."""
    monkeypatch.setenv("NEXUS_TIER_AI_FACTORY_MIN_VRAM_MB", "24000")
    monkeypatch.setenv("NEXUS_TIER_GPU_PEER_MIN_VRAM_MB", "10000")
    monkeypatch.setenv("NEXUS_TIER_GPU_INFRA_MIN_VRAM_MB", "4000")
    settings = Settings()
    spec = build_spec({"type": "noop", "requirements": {"min_vram_mb": min_vram_mb}}, settings, tenant="t")
    assert spec.queue == queue
    assert route_for(Requirements.parse({"min_vram_mb": min_vram_mb}), vram_thresholds(settings)) == queue


@pytest.mark.parametrize("requirements, message", [
    ({"tier": "moon"}, "unknown tier"),
    ({"gpu": "yes"}, "gpu"),
    ({"min_vram_mb": -1}, "min_vram_mb"),
    ({"tier": "cpu_only", "gpu": True}, "cpu_only"),
    ({"color": "red"}, "unknown requirement"),
    ({"model": "bad model!"}, "model"),
])
def test_bad_requirements_say_what_is_wrong(requirements, message):
    with pytest.raises(ValueError, match=message):
        Requirements.parse(requirements)


def test_workers_take_lower_tiers_only_when_allowed():
    assert queues_for_worker(Tier.GPU_PEER, take_lower_tiers=False) == ["gpu_peer"]
    assert queues_for_worker(Tier.GPU_PEER, take_lower_tiers=True) == ["gpu_peer", "gpu_infra", "cpu_only"]
    assert queues_for_worker(Tier.CPU_ONLY, take_lower_tiers=True) == ["cpu_only"]


def test_build_spec_validates_shape_type_and_payload():
    settings = Settings()
    spec = build_spec({"type": "sleep", "payload": {"seconds": 2}, "priority": 9}, settings, tenant="t")
    assert (spec.type, spec.queue, spec.priority, spec.tenant) == ("sleep", "cpu_only", 9, "t")
    assert spec.payload == {"seconds": 2.0} and spec.max_attempts == settings.default_max_attempts
    for raw, fragment in [
        ({"type": "noop", "priority": True}, "priority"),
        ({"type": "noop", "max_attempts": 0}, "max_attempts"),
        ({"type": "noop", "input_key": "k"}, "takes no input"),
        ({"type": "noop", "payload": {"bogus": 1}}, "unknown payload fields"),
        ({"type": "sleep", "payload": {"seconds": 10_000}}, "seconds"),
        ("not an object", "invalid job request"),
    ]:
        with pytest.raises(SubmissionError) as info:
            build_spec(raw, settings, tenant="t")
        assert fragment in str(info.value) + str(info.value.details)


def test_production_mode_refuses_default_secrets():
    with pytest.raises(ValueError, match="NEXUS_ADMIN_TOKEN"):
        Settings(mode="production")
    strong = {"s3_secret_key": "s" * 32, "admin_token": "a" * 32 + "x", "join_token": "j" * 32 + "y",
              "flower_password": "f" * 20 + "z", "worker_database_password": "w" * 20 + "q",
              "worker_redis_password": "v" * 20 + "k",
              "database_url": "postgresql+psycopg2://nexus:" + "p" * 20 + "@db/nexus",
              "redis_url": "redis://:" + "r" * 20 + "@redis:6379/0"}
    with pytest.raises(ValueError, match="NEXUS_S3_SECRET_KEY"):
        Settings(mode="production", **{**strong, "s3_secret_key": "minioadmin"})
    assert Settings(mode="production", **strong).mode.value == "production"


def test_a_jobs_own_errors_are_its_failures_and_the_nodes_are_infrastructure():
    """Only what says the node broke counts toward its quarantine (nexus.jobs.failures)."""
    from sqlalchemy.exc import OperationalError

    from nexus.inference.openai_shapes import BackendError, ContextLengthExceededError, ModelUnavailableError
    from nexus.jobs.builtin import InjectedFailure
    from nexus.jobs.failures import FailureKind, failure_kind
    from nexus.serving.backends.base import EngineFailed
    from nexus.serving.host import ModelNotServedHere
    from nexus.serving.jobs import RequestRejected

    job, infra = FailureKind.JOB, FailureKind.INFRASTRUCTURE
    assert failure_kind(InjectedFailure("injected failure on attempt 1")) is job  # `fail_attempts`
    assert failure_kind(ValueError("payload must be a JSON object")) is job
    assert failure_kind(KeyError("x")) is job and failure_kind(FileNotFoundError("x")) is job
    assert failure_kind(RequestRejected(ContextLengthExceededError("prompt too long"))) is job  # /v1, too long
    assert failure_kind(RequestRejected(BackendError("the model server is unreachable"))) is infra
    assert failure_kind(RequestRejected(ModelUnavailableError("no instance"))) is infra
    assert failure_kind(EngineFailed("the engine failed a step")) is infra
    assert failure_kind(ModelNotServedHere("not here")) is infra
    assert failure_kind(TimeoutError()) is infra and failure_kind(ConnectionRefusedError()) is infra
    assert failure_kind(OperationalError("SELECT 1", {}, Exception("server closed the connection"))) is infra
    assert failure_kind(RuntimeError("CUDA error: an illegal memory access was encountered")) is infra
    try:
        try:
            raise TimeoutError("object store read timed out")
        except TimeoutError as exc:
            raise RuntimeError("could not read the input") from exc
    except RuntimeError as wrapped:
        assert failure_kind(wrapped) is infra  # an explicit cause is followed
    try:
        try:
            raise TimeoutError("cache read timed out")
        except TimeoutError:
            raise ValueError("bad payload")  # noqa: B904 (raised while handling, not caused by it)
    except ValueError as unrelated:
        assert failure_kind(unrelated) is job


def test_the_job_record_is_the_api_shape_and_a_subset_of_the_table():
    import uuid
    from datetime import datetime, timezone

    from nexus.api.views import job_view
    from nexus.db.models import Job as JobTable
    from nexus.jobs.records import JOB_COLUMNS, Job
    from nexus.jobs.submit import _row_from_spec

    assert set(JOB_COLUMNS) <= set(JobTable.__table__.columns.keys())
    spec = build_spec({"type": "noop", "payload": {"echo": 1}}, Settings(), tenant="t", parent_id=uuid.uuid4())
    job = _row_from_spec(spec, datetime(2026, 12, 1, tzinfo=timezone.utc))
    view = job_view(job)
    assert list(view) == ["id", "type", "state", "priority", "tenant", "attempt", "max_attempts", "requirements",
                          "queue", "payload", "input_key", "idempotency_key", "parent_id", "result", "output_key",
                          "error", "progress", "node", "cancel_requested", "created_at", "started_at",
                          "finished_at", "updated_at"]
    assert view["id"] == str(spec.id) and view["created_at"] == "2026-12-01T00:00:00+00:00"
    assert Job.from_json({**view, "output_url": "http://x"}) == job
