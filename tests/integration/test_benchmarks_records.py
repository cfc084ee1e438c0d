"""Master side of benchmarks on a real PostgreSQL: the tables match their models, a finished benchmark
job becomes rows once, and each node keeps its latest measurement per model."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

import nexus.db.benchmarks  # noqa: F401  (registers the benchmark tables on the shared metadata)
from nexus.benchmarks import records
from nexus.benchmarks.cells import Cell
from nexus.db.models import Base
from tests.agent_support import registered

OURS = ("benchmarks", "benchmark_cells", "node_capacity")
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def cell(node: str, batch: int, tok_s: float, errors: int = 0) -> dict:
    return Cell(node, batch, 32, 32, batch, batch * 16, tok_s, 5.0, 9.0, 1.0, 200.0, "rss", errors).to_dict()


def finished_benchmark(conn, cells: list[dict], at: datetime, state: str = "succeeded") -> uuid.UUID:
    job_id = uuid.uuid4()
    conn.execute(text("INSERT INTO jobs (id, type, queue, state, tenant, result, finished_at) "
                      "VALUES (:id, 'benchmark', 'cpu_only', :state, 'default', CAST(:result AS jsonb), :at)"),
                 {"id": job_id, "state": state, "at": at, "result": json.dumps({"model": "tiny", "cells": cells})})
    return job_id


def test_benchmark_models_match_the_migrated_schema(services):
    with services.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert [change for change in diff if any(f"'{table}'" in str(change) for table in OURS)] == []


def test_a_finished_benchmark_is_recorded_once_and_the_latest_measurement_wins(services):
    with services.engine.begin() as conn:
        first = finished_benchmark(conn, [cell("a", 1, 100.0), cell("a", 4, 300.0), cell("a", 8, 900.0, errors=2),
                                          cell("b", 1, 50.0)], T0)
        finished_benchmark(conn, [cell("a", 1, 1.0)], T0, state="failed")  # never recorded
        assert records.record_finished(conn) == 1
        assert records.record_finished(conn) == 0
        assert len(records.cells(conn, first)) == 4
        capacity = {e["model"]: e["output_tok_s"] for e in records.capacity_of(conn, "a")}
        assert capacity == {"tiny": 300.0}  # the best cell without errors
        # A newer benchmark replaces a node's figure, an older one (recorded late) does not.
        finished_benchmark(conn, [cell("a", 1, 120.0)], T0 + timedelta(hours=1))
        finished_benchmark(conn, [cell("b", 1, 999.0)], T0 - timedelta(hours=1))
        assert records.record_finished(conn) == 2
        everything = records.capacity_all(conn)
    assert [e["output_tok_s"] for e in everything["a"]] == [120.0]
    assert [e["output_tok_s"] for e in everything["b"]] == [50.0]


def test_capacity_follows_live_nodes_by_name(services, api):
    node = registered(api, "bench-node-1")
    with services.engine.begin() as conn:
        finished_benchmark(conn, [cell("bench-node-1", 1, 77.0), cell("gone-node", 1, 88.0)], T0)
        records.record_finished(conn)
        assert records.capacity_by_node_id(conn, "tiny") == {node["node_id"]: 77.0}
    view = api.get(f"/api/v1/nodes/{node['node_id']}", headers={"Authorization": "Bearer " + _admin()}).json
    assert [(e["model"], e["output_tok_s"]) for e in view["measured"]] == [("tiny", 77.0)]


def _admin() -> str:
    from tests.support import ADMIN_TOKEN

    return ADMIN_TOKEN


def test_a_node_whose_workers_do_not_take_pinned_jobs_is_refused(services, api):
    from nexus.models import catalog
    from nexus.models.catalog import ModelSpec
    from tests.agent_support import beat

    with services.engine.begin() as conn:
        catalog.insert_model(conn, ModelSpec("tiny", "/models/tiny", max_model_len=512))
    old_agent = registered(api, "old-agent-node")  # registers its tier queues only
    assert beat(api, old_agent).status_code == 200
    body = {"model": "tiny", "batch_sizes": [1], "context_lengths": [32]}
    headers = {"Authorization": "Bearer " + _admin()}
    named = api.post("/api/v1/benchmarks", json={**body, "nodes": ["old-agent-node"]}, headers=headers)
    assert named.status_code == 400 and named.json["error"]["details"] == {"field": "nodes", "node": "old-agent-node"}
    assert "own queue" in named.json["error"]["message"]
    by_default = api.post("/api/v1/benchmarks", json=body, headers=headers)  # left out, so no node at all
    assert by_default.status_code == 400 and by_default.json["error"]["details"] == {"field": "nodes"}
