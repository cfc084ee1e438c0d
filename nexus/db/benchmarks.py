"""Tables of benchmarks: each finished benchmark, its cells, and every node's measured capacity per model.

The master writes all three from a finished `benchmark` job's result
(nexus.benchmarks.records); workers never do. A benchmark and its cells go with
its job (retention deletes the job, the rows follow); a node's capacity stays
until a newer benchmark of that model on that node replaces it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Text, Uuid, func
from sqlalchemy.orm import Mapped, mapped_column

from nexus.db.models import Base


class Benchmark(Base):
    __tablename__ = "benchmarks"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BenchmarkCell(Base):
    __tablename__ = "benchmark_cells"

    benchmark_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("benchmarks.id", ondelete="CASCADE"),
                                                    primary_key=True)
    node: Mapped[str] = mapped_column(String(200), primary_key=True)
    batch_size: Mapped[int] = mapped_column(Integer, primary_key=True)
    context_length: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    requests: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    output_tok_s: Mapped[float] = mapped_column(Float)
    ttft_p50_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p99_ms: Mapped[float | None] = mapped_column(Float)
    itl_p50_ms: Mapped[float | None] = mapped_column(Float)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float)
    memory_kind: Mapped[str] = mapped_column(String(8))
    errors: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class NodeCapacity(Base):
    """A node's latest measurement of a model: its best cell's output tok/s (placement prefers more)."""

    __tablename__ = "node_capacity"

    node: Mapped[str] = mapped_column(String(200), primary_key=True)  # as in nodes.name and jobs.node
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    output_tok_s: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    context_length: Mapped[int] = mapped_column(Integer)
    benchmark_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    measured_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
