"""jobs.lease_token: the secret a claim draws, shown by every later write of the attempt

Revision ID: 0007
Revises: 0006

A worker's database role reaches jobs only through SECURITY DEFINER functions
(installed by the master at start, nexus/jobs/worker_role.py). Their fence is the
attempt number and this token: the attempt number of any job is easy to guess, the
token only the claiming worker learns, so no worker can finish, fail, renew or add
children to an attempt it does not hold.
"""

from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('lease_token', sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'lease_token')
