"""What a failed attempt says about its node, and where a retried job may run: pure functions.

Failure kinds. Every failed attempt is classified once, where it is recorded
(the worker's `JobRunner._failed`, the reconciler's lease expiry), and the kind
is written on its job_events row (`failure_kind`). Only infrastructure failures
count toward a node's failure streak (the trigger of migration 0005) and so
toward quarantine (nexus.nodes.liveness); a success still ends a streak.

Why: a job's own exception is the job's failure, not the node's. A handler
that raises (`fail_attempts`, invalid input, a /v1 prompt that is too long)
fails the same way on every node, so counting it against the node that ran it
let one tenant quarantine the fleet (30 failing `noop` jobs quarantined a node
within 20 s). What does say the node is broken: its worker vanished or froze
(the lease expired unrenewed: killed, lost, partitioned), the engine, CUDA or
the model server failed, or a dependency timed out or was unreachable from it.

Placement. `nodes_for_retry` and `may_claim` are applied at claim time by
placement.py; they avoid the nodes a job failed on whatever the kind.
"""

from __future__ import annotations

from enum import Enum
from typing import Collection, Iterable

from sqlalchemy.exc import OperationalError


class FailureKind(str, Enum):
    INFRASTRUCTURE = "infrastructure"  # the node or its services failed the attempt: counts toward quarantine
    JOB = "job"  # the job failed itself (its handler raised, its input was bad): never counts against the node


# Exceptions that are the environment failing, whichever handler was running. OSError as a whole is
# not here: a FileNotFoundError for a path the payload named is the job's failure.
_INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError, OperationalError)


def failure_kind(exc: BaseException) -> FailureKind:
    """Classify an exception raised while a handler ran; the job's own unless proven otherwise.

    An exception (or one it was raised from) may declare its kind with a `failure_kind` attribute, as
    the serving layer's errors do (the engine failed, the model server crashed or answered 5xx).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        declared = getattr(current, "failure_kind", None)
        if declared is not None:
            return FailureKind(declared)
        if isinstance(current, _INFRASTRUCTURE_ERRORS) or _is_accelerator_failure(current):
            return FailureKind.INFRASTRUCTURE
        current = current.__cause__  # `raise ... from`: not __context__, an error raised while handling another
    return FailureKind.JOB


def _is_accelerator_failure(exc: BaseException) -> bool:
    """CUDA failing under the handler (torch's OutOfMemoryError / AcceleratorError, "CUDA error: ...").
    Recognised by name so this module does not import torch."""
    from_torch = type(exc).__module__.split(".")[0] == "torch"
    return (from_torch and "CUDA" in str(exc)) or str(exc).startswith("CUDA error")


def nodes_for_retry(eligible_nodes: Iterable[str], failed_on: Collection[str]) -> list[str]:
    """The eligible nodes a retried job may run on: those where it has not failed yet,
    or all eligible nodes when it has failed on every one of them (better a repeat than no run)."""
    eligible = list(eligible_nodes)
    fresh = [node for node in eligible if node not in failed_on]
    return fresh or eligible


def may_claim(node: str, failed_on: Collection[str], eligible_nodes: Iterable[str]) -> bool:
    """Whether `node` may claim a job that already failed on `failed_on`, given the other nodes
    that could take it now."""
    return node in nodes_for_retry(set(eligible_nodes) | {node}, failed_on)
