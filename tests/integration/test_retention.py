"""Retention: old finished job trees go with their events and objects; recent, running and
still-used things stay; /metrics reads active jobs through an index and keeps counting deleted ones."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import text

from nexus.api.metrics import ACTIVE_COUNTS
from nexus.jobs.retention import retention_pass
from tests.conftest import auth

DAY = 24 * 3600


def _job(conn, state: str, age_s: float, type_: str = "completion", parent=None, output_key=None, input_key=None,
         result=None) -> uuid.UUID:
    job_id = uuid.uuid4()
    finished = state in ("succeeded", "failed", "cancelled")
    conn.execute(text(
        """INSERT INTO jobs (id, type, queue, state, attempt, parent_id, output_key, input_key, result,
                             created_at, finished_at, lease_expires_at)
           VALUES (:id, :type, 'cpu_only', :state, 1, :parent, :out, :inp, CAST(:result AS jsonb),
                   now() - make_interval(secs => :age), CASE WHEN :finished THEN now() - make_interval(secs => :age) END,
                   CASE WHEN :state = 'running' THEN now() + interval '1 hour' END)"""),
        {"id": job_id, "type": type_, "state": state, "parent": parent, "out": output_key, "inp": input_key,
         "result": result, "age": age_s, "finished": finished})
    conn.execute(text("INSERT INTO job_events (job_id, to_state, attempt) VALUES (:id, :s, 1)"),
                 {"id": job_id, "s": state})
    return job_id


def _exists(conn, job_id) -> bool:
    return conn.execute(text("SELECT count(*) FROM jobs WHERE id = :id"), {"id": job_id}).scalar() == 1


def test_a_pass_deletes_old_finished_trees_events_and_objects_and_keeps_the_rest(services):
    s, store = services.settings, services.store
    for bucket, key in ((s.bucket_outputs, "old/out"), (s.bucket_outputs, "new/out"), (s.bucket_inputs, "shared/in"),
                        (s.bucket_inputs, "lonely/in"), (s.bucket_receipts, "proof/receipt"),
                        (s.bucket_receipts, "proof/segment")):
        store.put_bytes(bucket, key, b"x")
    with services.engine.begin() as conn:
        old = _job(conn, "succeeded", 2 * DAY, output_key="old/out", input_key="lonely/in")
        recent = _job(conn, "succeeded", 3600, output_key="new/out")
        running = _job(conn, "running", 2 * DAY)
        old_other = _job(conn, "failed", 2 * DAY, type_="noop")  # kept a month, not a day
        shares_input = _job(conn, "succeeded", 2 * DAY, input_key="shared/in")
        _job(conn, "queued", 10, type_="noop", input_key="shared/in")  # still needs the input
        proof = _job(conn, "succeeded", 40 * DAY, type_="proof", result='{"receipt_key": "proof/receipt"}')
        segment = _job(conn, "succeeded", 40 * DAY, type_="proof_segment", parent=proof,
                       result='{"result_key": "proof/segment"}')
        busy_parent = _job(conn, "cancelled", 40 * DAY, type_="batch")
        busy_child = _job(conn, "running", 40 * DAY, type_="completion", parent=busy_parent)

    counts = retention_pass(services.engine, s)

    with services.engine.connect() as conn:
        gone = [old, shares_input, proof, segment]
        assert [j for j in gone if _exists(conn, j)] == []
        events = conn.execute(text("SELECT count(*) FROM job_events WHERE job_id = ANY(:ids)"), {"ids": gone}).scalar()
        assert events == 0
        assert all(_exists(conn, j) for j in (recent, running, old_other, busy_parent, busy_child))
    assert counts["jobs_deleted"] == 4
    assert not store.exists(s.bucket_outputs, "old/out") and store.exists(s.bucket_outputs, "new/out")
    assert not store.exists(s.bucket_inputs, "lonely/in") and store.exists(s.bucket_inputs, "shared/in")
    assert not store.exists(s.bucket_receipts, "proof/receipt")
    assert not store.exists(s.bucket_receipts, "proof/segment")
    assert retention_pass(services.engine, s)["jobs_deleted"] == 0  # nothing left to do


def test_zero_keeps_everything_and_old_removed_nodes_and_stopped_instances_go(services):
    with services.engine.begin() as conn:
        old = _job(conn, "succeeded", 400 * DAY)
        conn.execute(text("""INSERT INTO nodes (id, name, token_hash, state, tier, hardware, agent_version,
                                                state_changed_at)
                             VALUES (gen_random_uuid(), 'gone', 'h1', 'removed', 'cpu_only', '{}', '1',
                                     now() - interval '60 days'),
                                    (gen_random_uuid(), 'here', 'h2', 'ready', 'cpu_only', '{}', '1',
                                     now() - interval '60 days')"""))
        conn.execute(text("INSERT INTO models (name, source, backend) VALUES ('m', '/x', 'transformers')"))
        conn.execute(text("""INSERT INTO model_instances (id, model, state, updated_at)
                             VALUES (gen_random_uuid(), 'm', 'stopped', now() - interval '60 days'),
                                    (gen_random_uuid(), 'm', 'running', now() - interval '60 days')"""))
    keep_all = services.settings.model_copy(update={"retention_completion_seconds": 0, "retention_seconds": 0})
    assert not any(retention_pass(services.engine, keep_all).values())
    # The counts are this pass's; the session's reconciler process (when an earlier test started it)
    # runs the same passes on the same tables, so the rows left are what the test checks.
    counts = retention_pass(services.engine, services.settings)
    assert all(counts[kind] <= 1 for kind in ("nodes_deleted", "instances_deleted", "jobs_deleted"))
    with services.engine.connect() as conn:
        assert not _exists(conn, old)
        assert conn.execute(text("SELECT array_agg(name) FROM nodes")).scalar() == ["here"]
        assert conn.execute(text("SELECT array_agg(state) FROM model_instances")).scalar() == ["running"]


def _plan(conn, statement, params=None) -> str:
    rows = conn.execute(text("EXPLAIN " + str(statement)), params or {}).all()
    return "\n".join(r[0] for r in rows)


def test_metrics_reads_active_jobs_through_an_index_and_counts_deleted_finished_jobs(api, services):
    with services.engine.begin() as conn:
        conn.execute(text("""INSERT INTO jobs (id, type, queue, state, attempt, finished_at)
                             SELECT gen_random_uuid(), 'noop', 'cpu_only', 'succeeded', 1, now() - interval '40 days'
                             FROM generate_series(1, 20000)"""))
        queued = _job(conn, "queued", 1, type_="noop")
        conn.execute(text("ANALYZE jobs"))
        plan = _plan(conn, ACTIVE_COUNTS)
        assert "Seq Scan" not in plan and re.search(r"Index (Only )?Scan using ix_jobs_(active|state_type)", plan), plan
        from nexus.jobs.retention import _DUE_ROOTS
        for statement in _DUE_ROOTS.values():
            due = _plan(conn, statement, {"age": DAY, "batch": 200})
            assert "Seq Scan" not in due and "ix_jobs_retention" in due, due
        # The transition that finishes a job counts it (a trigger), so retention can delete it.
        conn.execute(text("UPDATE jobs SET state = 'running' WHERE id = :id"), {"id": queued})
        conn.execute(text("UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '40 days' "
                          "WHERE id = :id"), {"id": queued})
    while retention_pass(services.engine, services.settings.model_copy(update={"retention_batch": 10_000}))[
            "jobs_deleted"]:
        pass
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    metrics = api.get("/metrics", headers=auth()).text
    assert re.search(r'nexus_jobs\{state="succeeded",type="noop"\} 1.0', metrics), metrics
    assert re.search(r'nexus_jobs\{state="queued",type="noop"\} 0.0', metrics)
