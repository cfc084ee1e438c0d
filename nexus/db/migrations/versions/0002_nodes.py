"""nodes: registered worker nodes, GPU reservations, failure streaks counted from job events

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

NODE_STATES = "'registering', 'ready', 'draining', 'stale', 'offline', 'quarantined', 'removed'"

# Every finished attempt writes one job_events row naming its node (worker fail/complete,
# reconciler lease expiry): count failure streaks there, so no code path is missed.
COUNT_FAILURES = """
CREATE FUNCTION nexus_count_node_failures() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE nodes SET consecutive_failures =
        CASE WHEN NEW.to_state = 'succeeded' THEN 0 ELSE consecutive_failures + 1 END
    WHERE name = NEW.node AND state <> 'removed';
    RETURN NULL;
END $$;
CREATE TRIGGER job_events_count_node_failures AFTER INSERT ON job_events FOR EACH ROW
    WHEN (NEW.node IS NOT NULL AND NEW.from_state = 'running'
          AND NEW.to_state IN ('succeeded', 'retrying', 'failed'))
    EXECUTE FUNCTION nexus_count_node_failures();
"""


def upgrade() -> None:
    op.create_table('nodes',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), server_default=sa.text("'registering'"), nullable=False),
    sa.Column('drain_requested', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('tier', sa.String(length=16), nullable=False),
    sa.Column('gpu_tiers', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('queues', postgresql.ARRAY(sa.String(length=200)), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('gpu_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('vram_total_mb', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('hardware', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('resources', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('running_jobs', postgresql.ARRAY(sa.String(length=64)), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('loaded_models', postgresql.ARRAY(sa.String(length=200)), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('workers', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('labels', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('max_concurrent', sa.Integer(), nullable=True),
    sa.Column('agent_version', sa.String(length=64), nullable=False),
    sa.Column('consecutive_failures', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('registered_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('state_changed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint(f"state IN ({NODE_STATES})", name='ck_nodes_state'),
    sa.CheckConstraint('max_concurrent IS NULL OR max_concurrent >= 1', name='ck_nodes_max_concurrent'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_index('uq_nodes_live_name', 'nodes', ['name'], unique=True, postgresql_where=sa.text("state <> 'removed'"))
    op.create_index('ix_nodes_state_heartbeat', 'nodes', ['state', 'last_heartbeat_at'], unique=False)
    op.create_table('gpu_reservations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('node_id', sa.Uuid(), nullable=False),
    sa.Column('gpu_index', sa.Integer(), nullable=False),
    sa.Column('memory_mb', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('note', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('memory_mb > 0', name='ck_reservations_memory'),
    sa.CheckConstraint('gpu_index >= 0', name='ck_reservations_gpu_index'),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_gpu_reservations_node_id'), 'gpu_reservations', ['node_id'], unique=False)
    op.create_index(op.f('ix_gpu_reservations_expires_at'), 'gpu_reservations', ['expires_at'], unique=False)
    op.execute(COUNT_FAILURES)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS job_events_count_node_failures ON job_events")
    op.execute("DROP FUNCTION IF EXISTS nexus_count_node_failures()")
    op.drop_index(op.f('ix_gpu_reservations_expires_at'), table_name='gpu_reservations')
    op.drop_index(op.f('ix_gpu_reservations_node_id'), table_name='gpu_reservations')
    op.drop_table('gpu_reservations')
    op.drop_index('ix_nodes_state_heartbeat', table_name='nodes')
    op.drop_index('uq_nodes_live_name', table_name='nodes', postgresql_where=sa.text("state <> 'removed'"))
    op.drop_table('nodes')
