"""The job lifecycle: one enum and the one table of allowed transitions."""

from __future__ import annotations

from enum import Enum
from typing import Iterable


class JobState(str, Enum):
    QUEUED = "queued"  # row committed, a message is (or will be re-) published
    RUNNING = "running"  # claimed by a worker under attempt N, lease held
    RETRYING = "retrying"  # attempt failed or its worker vanished; waits for its backoff
    SUCCEEDED = "succeeded"  # final: result recorded once, under the winning attempt
    FAILED = "failed"  # final: attempts exhausted (or not retryable), last error kept
    CANCELLED = "cancelled"  # final: cancelled while queued, or cooperatively while running

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# Written down once. A manual retry (POST /jobs/<id>/retry) takes a finished
# failed or cancelled job back to `retrying`, with one more attempt allowed.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RETRYING}),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.RETRYING}),
    JobState.CANCELLED: frozenset({JobState.RETRYING}),
}


class InvalidTransition(ValueError):
    pass


def can_transition(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


def check_transition(current: JobState, target: JobState) -> None:
    if not can_transition(current, target):
        raise InvalidTransition(f"a {current.value} job cannot become {target.value}")


def sources_of(target: JobState) -> tuple[str, ...]:
    """States from which `target` may be entered, for SQL `state IN (...)` guards."""
    return tuple(s.value for s, targets in TRANSITIONS.items() if target in targets)


def sql_in(column: str, states: Iterable[JobState | str]) -> str:
    """`column IN ('a', 'b')` for a guard, the states in the enum's order so the SQL text is stable."""
    wanted = {JobState(s) for s in states}
    if not wanted:
        raise ValueError("a state guard needs at least one state")
    return f"{column} IN ({', '.join(repr(s.value) for s in JobState if s in wanted)})"


# The guards the SQL uses, read off the table rather than written out again.
CLAIMABLE_STATES = sources_of(JobState.RUNNING)  # waiting for a worker: queued, retrying
ACTIVE_STATES = sources_of(JobState.CANCELLED)  # not finished, so still cancellable: queued, running, retrying
# Final, yet a manual retry may revive them: failed, cancelled.
RETRYABLE_BY_HAND = tuple(s for s in sources_of(JobState.RETRYING) if JobState(s).is_final)
