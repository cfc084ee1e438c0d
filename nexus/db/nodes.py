"""Tables of the node agent: registered nodes and VRAM reservations on their GPUs.

A node row holds what the agent sent at registration (hardware, tier, the
queues its workers consume) and what its last heartbeat said (resources,
running jobs, loaded models). The node token is stored only as a SHA-256 hash,
on the node's own row, so a token can act for that node and no other, and
removing the node (state `removed`) stops the token at once.

`consecutive_failures` is counted by a trigger on job_events (migration 0002):
every attempt a node finishes writes one event row, whichever code path wrote
it (the worker's fail/complete or the reconciler's lease expiry), so counting
there misses none. Since migration 0005 only events whose `failure_kind` is
'infrastructure' add to the streak (a job's own failure is not the node's,
nexus.jobs.failures); a success ends it. The reconciler quarantines a node
whose streak reaches `node_quarantine_after_failures`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, Uuid, func, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from nexus.nodes.states import NodeState
from nexus.db.models import Base

NODE_STATES_SQL = ", ".join(f"'{state.value}'" for state in NodeState)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))  # what workers write into jobs.node
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), server_default=text("'registering'"))
    drain_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))  # the admin's wish
    tier: Mapped[str] = mapped_column(String(16))
    gpu_tiers: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))  # "index" -> tier
    queues: Mapped[list[str]] = mapped_column(ARRAY(String(200)), server_default=text("'{}'"))
    gpu_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    vram_total_mb: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    hardware: Mapped[dict] = mapped_column(JSONB)
    resources: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    running_jobs: Mapped[list[str]] = mapped_column(ARRAY(String(64)), server_default=text("'{}'"))
    loaded_models: Mapped[list[str]] = mapped_column(ARRAY(String(200)), server_default=text("'{}'"))
    workers: Mapped[Any] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    labels: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    agent_version: Mapped[str] = mapped_column(String(64))
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    state_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The join (or worker) token it registered with: revoking that token removes the node.
    join_token_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)

    __table_args__ = (
        CheckConstraint(f"state IN ({NODE_STATES_SQL})", name="ck_nodes_state"),
        CheckConstraint("max_concurrent IS NULL OR max_concurrent >= 1", name="ck_nodes_max_concurrent"),
        # One live node per name: jobs.node and failed_nodes refer to nodes by name.
        Index("uq_nodes_live_name", "name", unique=True, postgresql_where=text("state <> 'removed'")),
        Index("ix_nodes_state_heartbeat", "state", "last_heartbeat_at"),
        Index("ix_nodes_join_token", "join_token_id", postgresql_where=text("join_token_id IS NOT NULL")),
        Index("ix_nodes_removed", "state_changed_at", postgresql_where=text("state = 'removed'")),
    )


class GpuReservation(Base):
    __tablename__ = "gpu_reservations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    node_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    gpu_index: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(200))  # who asked (token name), for listings
    note: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    __table_args__ = (
        CheckConstraint("memory_mb > 0", name="ck_reservations_memory"),
        CheckConstraint("gpu_index >= 0", name="ck_reservations_gpu_index"),
    )
