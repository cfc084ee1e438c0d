"""Only infrastructure failures count toward a node's failure streak.

Revision ID: 0005
Revises: 0004

Each failed attempt's event now records its cause in `job_events.failure_kind`
(nexus.jobs.failures.FailureKind): 'infrastructure' (worker lost, lease
expired, engine/CUDA/backend failure, timeouts) or 'job' (the handler raised,
the input was invalid). The streak trigger counts only the former: before, one
tenant's failing jobs (30 `noop` with `fail_attempts`) quarantined the node
that ran them. A success still ends a streak. Events written without a kind
(a worker older than this migration) do not count: such a worker could not
tell its handler's errors from its own.
"""

from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_COUNTED = """
CREATE TRIGGER job_events_count_node_failures AFTER INSERT ON job_events FOR EACH ROW
    WHEN (NEW.node IS NOT NULL AND NEW.from_state = 'running'
          AND (NEW.to_state = 'succeeded'
               OR (NEW.to_state IN ('retrying', 'failed') AND NEW.failure_kind = 'infrastructure')))
    EXECUTE FUNCTION nexus_count_node_failures();
"""

_PREVIOUS = """
CREATE TRIGGER job_events_count_node_failures AFTER INSERT ON job_events FOR EACH ROW
    WHEN (NEW.node IS NOT NULL AND NEW.from_state = 'running'
          AND NEW.to_state IN ('succeeded', 'retrying', 'failed'))
    EXECUTE FUNCTION nexus_count_node_failures();
"""


def upgrade() -> None:
    op.add_column('job_events', sa.Column('failure_kind', sa.String(length=16), nullable=True))
    op.create_check_constraint('ck_job_events_failure_kind', 'job_events',
                               "failure_kind IS NULL OR failure_kind IN ('infrastructure', 'job')")
    op.execute("DROP TRIGGER job_events_count_node_failures ON job_events")
    op.execute(_COUNTED)  # the function (0004) is unchanged: the WHEN clause picks the rows it sees


def downgrade() -> None:
    op.execute("DROP TRIGGER job_events_count_node_failures ON job_events")
    op.execute(_PREVIOUS)
    op.drop_constraint('ck_job_events_failure_kind', 'job_events', type_='check')
    op.drop_column('job_events', 'failure_kind')
