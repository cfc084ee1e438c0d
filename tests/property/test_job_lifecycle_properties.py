"""Hypothesis drives jobs, one after another, through claims, completions, failures, lease expiries, cancels and manual
retries, issued by several workers that may hold stale attempts, against the real PostgreSQL.

A small model says what each call must do; after every step the row must match
it and the event log must replay to the row through allowed transitions only,
with at most one recorded completion and never an attempt past max_attempts.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, settings as hypothesis_settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)
from sqlalchemy import text

from nexus.jobs import lifecycle
from nexus.jobs.lifecycle import JobSpec
from nexus.jobs.reconciler import BATCH, _EXPIRE_LEASES
from nexus.jobs.states import JobState, can_transition

pytestmark = pytest.mark.timeout(180)

NODES = st.sampled_from(["node-a", "node-b", "node-c"])
WAITING = {"queued", "retrying"}


class JobLifecycle(RuleBasedStateMachine):
    engine = None  # set by the test: the session's real database

    @initialize(max_attempts=st.integers(1, 5))
    def submit(self, max_attempts):
        self._new_job(max_attempts)

    @precondition(lambda self: self.state in ("succeeded", "failed", "cancelled"))
    @rule(max_attempts=st.integers(1, 5))
    def next_job(self, max_attempts):
        """A finished job has little left to explore: go on with a fresh one (its checks ran at every step)."""
        self._new_job(max_attempts)

    def teardown(self):
        """Remove this example's jobs, so no running row outlives it for a later example's expiry."""
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": self.job_ids})

    def _new_job(self, max_attempts):
        self.job_id = uuid.uuid4()
        self.job_ids = [*getattr(self, "job_ids", []), self.job_id]
        with self.engine.begin() as conn:  # a row only: no message, no worker takes it behind our back
            lifecycle.insert_jobs(conn, [JobSpec(type="noop", queue="property", max_attempts=max_attempts,
                                                 id=self.job_id)])
        self.state, self.attempt, self.max_attempts, self.cancel_requested = "queued", 0, max_attempts, False
        self.held: dict[str, int] = {}  # node -> the attempt it believes it runs (may be stale)

    # --- what workers and the message flow do ------------------------------------------------
    @precondition(lambda self: self.state in WAITING)
    @rule(node=NODES)
    def claim_next_attempt(self, node):
        row = self._write(lifecycle.claim, self.job_id, self.attempt + 1, node, 30)
        allowed = self.state in WAITING and self.attempt < self.max_attempts and not self.cancel_requested
        assert (row is not None) == allowed, (self.state, self.attempt, self.cancel_requested)
        if row:
            self.state, self.attempt = "running", self.attempt + 1
            self.held[node] = self.attempt

    @rule(node=NODES, stale_by=st.integers(0, 2))
    def duplicate_or_stale_message(self, node, stale_by):
        """A message for an attempt that already ran (redelivered or re-published) never claims."""
        assert self._write(lifecycle.claim, self.job_id, self.attempt - stale_by, node, 30) is None

    @precondition(lambda self: self.state == "running")
    @rule()
    def complete(self):
        row = self._write(lifecycle.complete, self.job_id, self.attempt, self._owner(), {"done": True}, None)
        assert row is not None and row.state == "succeeded"
        self.state = "succeeded"

    @precondition(lambda self: self.state == "running")
    @rule(retry=st.booleans())
    def fail(self, retry):
        row = self._write(lifecycle.fail, self.job_id, self.attempt, self._owner(), "boom", retry, 0.0)
        again = retry and self.attempt < self.max_attempts and not self.cancel_requested
        self.state = "retrying" if again else "failed"
        assert row is not None and row.state == self.state

    @precondition(lambda self: self.state == "running" and self.cancel_requested)
    @rule()
    def stop_for_cancel(self):
        assert self._write(lifecycle.mark_cancelled, self.job_id, self.attempt, self._owner()) is not None
        self.state = "cancelled"

    @precondition(lambda self: any(a != self.attempt or self.state != "running" for a in self.held.values()))
    @rule(data=st.data(), write=st.sampled_from(["complete", "fail", "cancelled"]))
    def zombie_writes(self, data, write):
        """A worker whose attempt is over (lease expired, job finished or retried) is fenced off."""
        node, attempt = data.draw(st.sampled_from(sorted(
            (n, a) for n, a in self.held.items() if a != self.attempt or self.state != "running")))
        calls = {"complete": (lifecycle.complete, node, {"zombie": True}, None),
                 "fail": (lifecycle.fail, node, "late", True, 0.0), "cancelled": (lifecycle.mark_cancelled, node)}
        fn, *rest = calls[write]
        assert self._write(fn, self.job_id, attempt, *rest) is None

    @precondition(lambda self: self.state == "running")
    @rule()
    def lease_expires(self):
        """The worker vanished: the reconciler's own statement ends the attempt."""
        with self.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                              "WHERE id = :id AND state = 'running'"), {"id": self.job_id})
            expired = {row.id for row in conn.execute(_EXPIRE_LEASES, {"batch": BATCH})}
        # Either this statement ended the attempt or the session's reconciler, running the same
        # statement, got there first; the invariants check the row is no longer running either way.
        assert self.job_id in expired or self._row()["state"] != "running"
        self.state = "cancelled" if self.cancel_requested else \
            "retrying" if self.attempt < self.max_attempts else "failed"

    # --- what users do --------------------------------------------------------------------------
    @rule()
    def cancel(self):
        self._write(lifecycle.request_cancel, self.job_id, "property test")
        if self.state in WAITING:
            self.state, self.cancel_requested = "cancelled", True
        elif self.state == "running":
            self.cancel_requested = True

    @rule()
    def manual_retry(self):
        row = self._write(lifecycle.manual_retry, self.job_id, "property test")
        assert (row is not None) == (self.state in ("failed", "cancelled"))
        if row:
            self.state, self.cancel_requested = "retrying", False
            self.max_attempts = max(self.max_attempts, self.attempt + 1)

    # --- what must always hold ------------------------------------------------------------------
    @invariant()
    def row_matches_the_model(self):
        row = self._row()
        assert (row["state"], row["attempt"], row["max_attempts"]) == (self.state, self.attempt, self.max_attempts)
        assert row["attempt"] <= row["max_attempts"]

    @invariant()
    def event_log_replays_to_the_row(self):
        with self.engine.connect() as conn:
            events = conn.execute(text("SELECT from_state, to_state, attempt FROM job_events WHERE job_id = :id "
                                       "ORDER BY id"), {"id": self.job_id}).all()
        assert events[0].from_state is None and events[0].to_state == "queued"
        for before, after in zip(events, events[1:]):
            assert after.from_state == before.to_state
            assert can_transition(JobState(after.from_state), JobState(after.to_state)), after
        assert events[-1].to_state == self.state
        assert sum(e.to_state == "succeeded" for e in events) <= 1
        assert [e.attempt for e in events if e.to_state == "running"] == list(range(1, self.attempt + 1))

    # --- helpers ----------------------------------------------------------------------------------
    def _owner(self) -> str:
        return next(n for n, a in self.held.items() if a == self.attempt)

    def _write(self, fn, *args):
        with self.engine.begin() as conn:
            return fn(conn, *args)

    def _row(self) -> dict:
        with self.engine.connect() as conn:
            return dict(conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": self.job_id}).mappings().one())


def test_job_lifecycle_under_interleaved_workers(services):
    JobLifecycle.engine = services.engine
    run_state_machine_as_test(JobLifecycle, settings=hypothesis_settings(
        max_examples=150, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow]))
