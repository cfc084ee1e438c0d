"""Diagnostic job types used by tests, benchmarks and operators: `noop` and `sleep`."""

from __future__ import annotations

import time
from typing import Any

from nexus.jobs.context import JobContext
from nexus.jobs.registry import JobType

MAX_SLEEP_SECONDS = 3600.0


class InjectedFailure(RuntimeError):
    """Raised on purpose by `fail_attempts`, to exercise retries."""


def _check_object(payload: Any, allowed: set[str]) -> dict[str, Any]:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise ValueError("payload must be a JSON object")
    unknown = set(payload) - allowed
    if unknown:
        raise ValueError(f"unknown payload fields: {sorted(unknown)}; allowed: {sorted(allowed)}")
    return payload


def _check_fail_attempts(payload: dict[str, Any]) -> None:
    value = payload.get("fail_attempts", 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ValueError("fail_attempts must be an integer between 0 and 100")


def _maybe_fail(ctx: JobContext, payload: dict[str, Any]) -> None:
    if ctx.attempt <= payload.get("fail_attempts", 0):
        raise InjectedFailure(f"injected failure on attempt {ctx.attempt}")


def validate_noop(payload: Any) -> dict[str, Any]:
    checked = _check_object(payload, {"echo", "fail_attempts"})
    _check_fail_attempts(checked)
    return checked


def run_noop(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    _maybe_fail(ctx, payload)
    return {"echo": payload.get("echo")}


def validate_sleep(payload: Any) -> dict[str, Any]:
    payload = _check_object(payload, {"seconds", "fail_attempts"})
    seconds = payload.get("seconds", 1.0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise ValueError(f"seconds must be a number between 0 and {MAX_SLEEP_SECONDS:g}")
    _check_fail_attempts(payload)
    return {**payload, "seconds": float(seconds)}


def run_sleep(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Sleeps in small steps, checking for cancellation between them."""
    _maybe_fail(ctx, payload)
    started = time.monotonic()
    ctx.sleep(payload.get("seconds", 1.0))
    return {"slept": round(time.monotonic() - started, 3)}


noop = JobType(name="noop", run=run_noop, validate=validate_noop, accepts_input=False)
sleep = JobType(name="sleep", run=run_sleep, validate=validate_sleep, accepts_input=False)
