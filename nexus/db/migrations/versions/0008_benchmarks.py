"""benchmarks: finished benchmarks, their cells, each node's measured capacity per model

Revision ID: 0008
Revises: 0006

- `benchmarks` (one row per finished `benchmark` job, deleted with it) and
  `benchmark_cells` (node x batch size x context length), written by the master.
- `node_capacity`: each node's latest measurement of a model (its best cell's output
  tok/s), kept when the benchmark's job is deleted; placement prefers the fastest node.
"""

from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "benchmarks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "benchmark_cells",
        sa.Column("benchmark_id", sa.Uuid(), nullable=False),
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tok_s", sa.Float(), nullable=False),
        sa.Column("ttft_p50_ms", sa.Float(), nullable=True),
        sa.Column("ttft_p99_ms", sa.Float(), nullable=True),
        sa.Column("itl_p50_ms", sa.Float(), nullable=True),
        sa.Column("peak_memory_mb", sa.Float(), nullable=True),
        sa.Column("memory_kind", sa.String(length=8), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["benchmark_id"], ["benchmarks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("benchmark_id", "node", "batch_size", "context_length"),
    )
    op.create_table(
        "node_capacity",
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("output_tok_s", sa.Float(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.Column("benchmark_id", sa.Uuid(), nullable=False),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node", "model"),
    )


def downgrade() -> None:
    op.drop_table("node_capacity")
    op.drop_table("benchmark_cells")
    op.drop_table("benchmarks")
