"""retention indexes, finished-job counters, token expiry and kinds, the token a node joined with

Revision ID: 0006
Revises: 0005

- Two partial indexes find finished root jobs by age, one for `completion` jobs (kept a
  day) and one for the rest (kept a month): a retention pass with nothing to delete
  reads one index page each.
- `job_counters` holds how many jobs ever reached each final state, per type, written by
  a trigger on the transition that finishes a job (whichever code path wrote it), so
  /metrics counts finished work without scanning it, and deleted jobs stay counted.
  Rows are sharded by backend pid: concurrent completions of one type mostly update
  different rows instead of queueing on one row lock.
- api_tokens.expires_at (optional expiry) and api_tokens.kind: `api` (made through the
  API), `bootstrap` (NEXUS_ADMIN_TOKEN), `join` (NEXUS_JOIN_TOKEN and rotated join tokens).
- nodes.join_token_id: the token a node registered with; revoking it removes the node.
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

FINAL = "('succeeded', 'failed', 'cancelled')"
COUNTER_SHARDS = 8

_COUNT_FINISHED = f"""
CREATE FUNCTION nexus_count_finished_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counters (type, state, shard, n) VALUES (NEW.type, NEW.state, pg_backend_pid() % {COUNTER_SHARDS}, 1)
    ON CONFLICT (type, state, shard) DO UPDATE SET n = job_counters.n + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_count_finished AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (NEW.state IN {FINAL} AND OLD.state NOT IN {FINAL})
    EXECUTE FUNCTION nexus_count_finished_jobs();
"""


def upgrade() -> None:
    op.create_index('ix_jobs_retention_completion', 'jobs', ['finished_at'],
                    postgresql_where=sa.text(f"parent_id IS NULL AND type = 'completion' AND state IN {FINAL}"))
    op.create_index('ix_jobs_retention_other', 'jobs', ['finished_at'],
                    postgresql_where=sa.text(f"parent_id IS NULL AND type <> 'completion' AND state IN {FINAL}"))
    # An input object is deleted only when no remaining job refers to it.
    op.create_index('ix_jobs_input_key', 'jobs', ['input_key'], postgresql_where=sa.text("input_key IS NOT NULL"))
    op.create_table('job_counters',
                    sa.Column('type', sa.String(length=64), nullable=False),
                    sa.Column('state', sa.String(length=16), nullable=False),
                    sa.Column('shard', sa.SmallInteger(), nullable=False),
                    sa.Column('n', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
                    sa.PrimaryKeyConstraint('type', 'state', 'shard'))
    # Jobs finished before this migration count too.
    op.execute(f"INSERT INTO job_counters (type, state, shard, n) SELECT type, state, 0, count(*) FROM jobs "
               f"WHERE state IN {FINAL} GROUP BY type, state")
    op.execute(_COUNT_FINISHED)
    op.add_column('api_tokens', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_tokens', sa.Column('kind', sa.String(length=16), server_default=sa.text("'api'"),
                                          nullable=False))
    op.create_check_constraint('ck_tokens_kind', 'api_tokens', "kind IN ('api','bootstrap','join')")
    op.execute("UPDATE api_tokens SET kind = 'bootstrap' WHERE name = 'bootstrap-admin'")
    op.add_column('nodes', sa.Column('join_token_id', sa.Uuid(), nullable=True))
    op.create_index('ix_nodes_join_token', 'nodes', ['join_token_id'],
                    postgresql_where=sa.text("join_token_id IS NOT NULL"))
    op.create_index('ix_nodes_removed', 'nodes', ['state_changed_at'], postgresql_where=sa.text("state = 'removed'"))
    op.create_index('ix_model_instances_stopped', 'model_instances', ['updated_at'],
                    postgresql_where=sa.text("state = 'stopped'"))


def downgrade() -> None:
    op.drop_index('ix_model_instances_stopped', table_name='model_instances')
    op.drop_index('ix_nodes_removed', table_name='nodes')
    op.drop_index('ix_nodes_join_token', table_name='nodes')
    op.drop_column('nodes', 'join_token_id')
    op.drop_constraint('ck_tokens_kind', 'api_tokens')
    op.drop_column('api_tokens', 'kind')
    op.drop_column('api_tokens', 'expires_at')
    op.execute("DROP TRIGGER IF EXISTS jobs_count_finished ON jobs")
    op.execute("DROP FUNCTION IF EXISTS nexus_count_finished_jobs()")
    op.drop_table('job_counters')
    op.drop_index('ix_jobs_input_key', table_name='jobs')
    op.drop_index('ix_jobs_retention_other', table_name='jobs')
    op.drop_index('ix_jobs_retention_completion', table_name='jobs')
