"""Master side: a finished benchmark's rows, and each node's measured capacity per model.

Workers report cells in their jobs' results; the master turns a succeeded
`benchmark` job into rows with `record_finished`, which every reader of
benchmarks or capacity calls first (the benchmark and node routes, placement),
so the rows exist before anyone reads them and no worker writes them. It is
idempotent: a benchmark is recorded once (its `benchmarks` row), and a node's
capacity is replaced only by a measurement at least as recent.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, text

from nexus.benchmarks.cells import Cell, CSV_COLUMNS, best_per_node
from nexus.benchmarks.jobs import BENCHMARK_TYPE

_UNRECORDED = text(
    """SELECT j.id, j.tenant, j.result, j.finished_at FROM jobs j
       WHERE j.type = :type AND j.state = 'succeeded'
         AND NOT EXISTS (SELECT 1 FROM benchmarks b WHERE b.id = j.id)
       ORDER BY j.finished_at"""
)
_INSERT_BENCHMARK = text(
    "INSERT INTO benchmarks (id, model, tenant) VALUES (:id, :model, :tenant) ON CONFLICT (id) DO NOTHING RETURNING id")
_CELL_COLUMNS = list(CSV_COLUMNS)
_INSERT_CELL = text(
    f"""INSERT INTO benchmark_cells (benchmark_id, {", ".join(_CELL_COLUMNS)})
        VALUES (:benchmark_id, {", ".join(":" + c for c in _CELL_COLUMNS)})
        ON CONFLICT DO NOTHING"""
)
_UPSERT_CAPACITY = text(
    """INSERT INTO node_capacity (node, model, output_tok_s, batch_size, context_length, benchmark_id, measured_at)
       VALUES (:node, :model, :output_tok_s, :batch_size, :context_length, :benchmark_id, :measured_at)
       ON CONFLICT (node, model) DO UPDATE SET output_tok_s = EXCLUDED.output_tok_s,
           batch_size = EXCLUDED.batch_size, context_length = EXCLUDED.context_length,
           benchmark_id = EXCLUDED.benchmark_id, measured_at = EXCLUDED.measured_at
       WHERE node_capacity.measured_at <= EXCLUDED.measured_at"""
)


def record_finished(conn: Connection) -> int:
    """Rows for every succeeded benchmark not recorded yet; how many were recorded."""
    recorded = 0
    for row in conn.execute(_UNRECORDED, {"type": BENCHMARK_TYPE}).all():
        result = row.result if isinstance(row.result, dict) else {}
        model = str(result.get("model", ""))
        if conn.execute(_INSERT_BENCHMARK, {"id": row.id, "model": model, "tenant": row.tenant}).first() is None:
            continue  # another master process recorded it meanwhile
        cells = [Cell.from_dict(raw) for raw in result.get("cells", [])]
        if cells:
            conn.execute(_INSERT_CELL, [{"benchmark_id": row.id, **cell.to_dict()} for cell in cells])
        for node, cell in best_per_node(cells).items():
            conn.execute(_UPSERT_CAPACITY, {"node": node, "model": model, "output_tok_s": cell.output_tok_s,
                                            "batch_size": cell.batch_size, "context_length": cell.context_length,
                                            "benchmark_id": row.id, "measured_at": row.finished_at})
        recorded += 1
    return recorded


def cells(conn: Connection, benchmark_id: uuid.UUID) -> list[Cell]:
    rows = conn.execute(text(f"SELECT {', '.join(_CELL_COLUMNS)} FROM benchmark_cells WHERE benchmark_id = :id "
                             "ORDER BY node, context_length, batch_size"), {"id": benchmark_id}).mappings()
    return [Cell.from_dict(dict(r)) for r in rows]


def capacity_by_node_id(conn: Connection, model: str) -> dict[str, float]:
    """Live node id -> measured output tok/s of `model`, for placement."""
    rows = conn.execute(text("SELECT n.id, c.output_tok_s FROM node_capacity c JOIN nodes n ON n.name = c.node "
                             "AND n.state <> 'removed' WHERE c.model = :model"), {"model": model})
    return {str(node_id): float(tok_s) for node_id, tok_s in rows}


def capacity_of(conn: Connection, node: str) -> list[dict[str, Any]]:
    """A node's measured capacity, one entry per model, for the node view and `nexus status`."""
    rows = conn.execute(text("SELECT model, output_tok_s, batch_size, context_length, benchmark_id, measured_at "
                             "FROM node_capacity WHERE node = :node ORDER BY model"), {"node": node}).mappings()
    return [{**dict(r), "benchmark_id": str(r["benchmark_id"]), "measured_at": r["measured_at"].isoformat()}
            for r in rows]


def capacity_all(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Node name -> its measured capacity entries."""
    out: dict[str, list[dict[str, Any]]] = {}
    rows = conn.execute(text("SELECT node, model, output_tok_s, batch_size, context_length, measured_at "
                             "FROM node_capacity ORDER BY node, model")).mappings()
    for r in rows:
        out.setdefault(r["node"], []).append({"model": r["model"], "output_tok_s": r["output_tok_s"],
                                              "batch_size": r["batch_size"], "context_length": r["context_length"],
                                              "measured_at": r["measured_at"].isoformat()})
    return out
