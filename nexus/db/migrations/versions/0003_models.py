"""models: the model catalog and model instances

Revision ID: 0003
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("args", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("vram_mb", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("min_tier", sa.String(length=16), server_default=sa.text("'cpu_only'"), nullable=False),
        sa.Column("max_model_len", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("backend IN ('transformers', 'vllm', 'openai')", name="ck_models_backend"),
        sa.CheckConstraint("min_tier IN ('ai_factory', 'gpu_peer', 'gpu_infra', 'cpu_only')",
                           name="ck_models_min_tier"),
        sa.CheckConstraint("vram_mb >= 0", name="ck_models_vram"),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "model_instances",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("node_id", sa.String(length=200), nullable=True),
        sa.Column("gpus", postgresql.ARRAY(sa.Integer()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("plan", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'downloading', 'starting', 'running', 'error', 'stopped')",
                           name="ck_model_instances_state"),
        sa.ForeignKeyConstraint(["model"], ["models.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_model_instances_model_state", "model_instances", ["model", "state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_model_instances_model_state", table_name="model_instances")
    op.drop_table("model_instances")
    op.drop_table("models")
