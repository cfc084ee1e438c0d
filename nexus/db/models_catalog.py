"""Tables of the model catalog: declared models and their deployed instances.

A model is what may be served (where its weights are, which backend, how much
VRAM it needs); an instance is one deployment of it on a node's GPUs (or a CPU
worker, or an outside OpenAI-compatible URL) with a state the serving side reports.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Index, Integer, String, Text, Uuid, func, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from nexus.db.models import Base

INSTANCE_STATES = ("pending", "downloading", "starting", "running", "error", "stopped")
BACKENDS = ("transformers", "vllm", "openai")
TIERS = ("ai_factory", "gpu_peer", "gpu_infra", "cpu_only")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ModelEntry(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    # A local path on the workers, or "s3://<bucket>/<prefix>" in the object store.
    source: Mapped[str] = mapped_column(String(1024))
    backend: Mapped[str] = mapped_column(String(16))
    # Backend options: vLLM extra args, served model name, the openai backend's url, dtype...
    args: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    vram_mb: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    min_tier: Mapped[str] = mapped_column(String(16), server_default=text("'cpu_only'"))
    max_model_len: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(_in("backend", BACKENDS), name="ck_models_backend"),
        CheckConstraint(_in("min_tier", TIERS), name="ck_models_min_tier"),
        CheckConstraint("vram_mb >= 0", name="ck_models_vram"),
    )


class ModelInstance(Base):
    __tablename__ = "model_instances"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    model: Mapped[str] = mapped_column(String(128), ForeignKey("models.name", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    # Where placement put it (the agent's node id); NULL: any worker serving the model may adopt it.
    node_id: Mapped[str | None] = mapped_column(String(200))
    gpus: Mapped[list[int]] = mapped_column(ARRAY(Integer), server_default=text("'{}'"))
    # The parallelism plan: strategy, tensor/pipeline sizes, stages [{node_id, gpus}], memory utilisation.
    plan: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    worker: Mapped[str | None] = mapped_column(String(255))  # the Celery worker serving it
    # Drawn when a serving worker takes the instance, known only to it: its later writes show it (0010).
    worker_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    error: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(_in("state", INSTANCE_STATES), name="ck_model_instances_state"),
        Index("ix_model_instances_model_state", "model", "state"),
        Index("ix_model_instances_stopped", "updated_at", postgresql_where=text("state = 'stopped'")),
    )
