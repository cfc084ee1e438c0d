"""indexes for tenants' shares of a queue: published and held waiting jobs per tenant and queue

Revision ID: 0009
Revises: 0006

nexus.jobs.fairshare publishes a tenant's jobs only while it has fewer than
NEXUS_MAX_BROKER_MESSAGES_PER_TENANT messages waiting on a queue; the others wait
as held rows (published_attempt <= attempt, as due retries always did). Every
submission, every claim and each reconciler pass count the first kind and look
for the second, per tenant and queue: partial indexes keep each of those an
index probe, however large a tenant's backlog (a claim must not cost O(backlog)):
published jobs; held jobs in the order they go out; held jobs by the end of their
backoff (is any ready now).
No data changes: held rows are what retries already were.
"""

from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

WAITING = "state IN ('queued', 'retrying')"


def upgrade() -> None:
    op.create_index('ix_jobs_share_published', 'jobs', ['tenant', 'queue'],
                    postgresql_where=sa.text(f"{WAITING} AND published_attempt > attempt"))
    op.create_index('ix_jobs_share_held', 'jobs', ['tenant', 'queue', sa.text('priority DESC'), 'created_at', 'id'],
                    postgresql_where=sa.text(f"{WAITING} AND published_attempt <= attempt"))
    # Whether any held job is ready (its backoff over): the first entry of the range answers.
    op.create_index('ix_jobs_share_ready', 'jobs', ['tenant', 'queue', sa.text("coalesce(not_before, '-infinity'::timestamptz)")],
                    postgresql_where=sa.text(f"{WAITING} AND published_attempt <= attempt"))


def downgrade() -> None:
    op.drop_index('ix_jobs_share_ready', table_name='jobs')
    op.drop_index('ix_jobs_share_held', table_name='jobs')
    op.drop_index('ix_jobs_share_published', table_name='jobs')
