"""Tables: PostgreSQL is the source of truth for jobs, their history and API tokens.

Schema changes go through Alembic (nexus/db/migrations); these classes are the
typed view the code uses, and a test checks they match the migrated schema.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[Any] = mapped_column(JSONB, nullable=True)
    input_key: Mapped[str | None] = mapped_column(String(1024))
    requirements: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    queue: Mapped[str] = mapped_column(String(200))
    priority: Mapped[int] = mapped_column(SmallInteger, server_default=text("5"))
    state: Mapped[str] = mapped_column(String(16), server_default=text("'queued'"))
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    # Retry backoff: a retrying job is not claimable (nor published) before this.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The attempt number the last published message was for, and when: the reconciler's
    # evidence of whether a message exists and how old it is.
    published_attempt: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Drawn by each claim and known only to the claiming worker: the attempt's writes must show it.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    node: Mapped[str | None] = mapped_column(String(200))
    failed_nodes: Mapped[list[str]] = mapped_column(ARRAY(String(200)), server_default=text("'{}'"))
    tenant: Mapped[str] = mapped_column(String(64), server_default=text("'default'"))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    result: Mapped[Any] = mapped_column(JSONB, nullable=True)
    output_key: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[Any] = mapped_column(JSONB, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    parent_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("priority BETWEEN 0 AND 9", name="ck_jobs_priority"),
        CheckConstraint(
            "state IN ('queued','running','retrying','succeeded','failed','cancelled')", name="ck_jobs_state"
        ),
        CheckConstraint("attempt <= max_attempts", name="ck_jobs_attempt_cap"),
        Index("uq_jobs_tenant_idempotency", "tenant", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL")),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ix_jobs_state_type", "state", "type"),
        Index("ix_jobs_parent", "parent_id", postgresql_where=text("parent_id IS NOT NULL")),
        # The reconciler scans only unfinished jobs; keep that scan small.
        Index("ix_jobs_active", "state", "lease_expires_at",
              postgresql_where=text("state IN ('queued','running','retrying')")),
        # Retention finds finished root jobs by age: completions are kept far shorter than the rest.
        Index("ix_jobs_retention_completion", "finished_at", postgresql_where=text(
            "parent_id IS NULL AND type = 'completion' AND state IN ('succeeded', 'failed', 'cancelled')")),
        Index("ix_jobs_retention_other", "finished_at", postgresql_where=text(
            "parent_id IS NULL AND type <> 'completion' AND state IN ('succeeded', 'failed', 'cancelled')")),
        Index("ix_jobs_input_key", "input_key", postgresql_where=text("input_key IS NOT NULL")),
        # A tenant's share of a queue (nexus/jobs/fairshare.py): its jobs with a message out, its held ones.
        Index("ix_jobs_share_published", "tenant", "queue", postgresql_where=text(
            "state IN ('queued', 'retrying') AND published_attempt > attempt")),
        Index("ix_jobs_share_held", "tenant", "queue", text("priority DESC"), "created_at", "id",
              postgresql_where=text("state IN ('queued', 'retrying') AND published_attempt <= attempt")),
        Index("ix_jobs_share_ready", "tenant", "queue", text("coalesce(not_before, '-infinity'::timestamptz)"),
              postgresql_where=text("state IN ('queued', 'retrying') AND published_attempt <= attempt")),
    )


class JobCounter(Base):
    """How many jobs ever reached each final state, per type (a trigger of migration 0005 counts them)."""

    __tablename__ = "job_counters"

    type: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    node: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)
    # Why a running attempt failed (nexus.jobs.failures.FailureKind); only 'infrastructure' counts
    # toward the node's failure streak (migration 0005).
    failure_kind: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint("failure_kind IS NULL OR failure_kind IN ('infrastructure', 'job')",
                        name="ck_job_events_failure_kind"),
    )


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the token itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a token in listings
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(64), server_default=text("'default'"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # NULL: never
    # api: made through the API; bootstrap: NEXUS_ADMIN_TOKEN; join: NEXUS_JOIN_TOKEN or a rotated join token.
    kind: Mapped[str] = mapped_column(String(16), server_default=text("'api'"))

    __table_args__ = (CheckConstraint("role IN ('admin','submitter','worker')", name="ck_tokens_role"),
                      CheckConstraint("kind IN ('api','bootstrap','join')", name="ck_tokens_kind"))
