"""model_instances.worker_token: the serving worker's hold on its instance row

Revision ID: 0010
Revises: 0009

A serving worker writes its instance only through the worker role's functions
(nexus.models.catalog, WORKER_INSTANCE_WRITES): taking an instance draws a token
that only the taker learns, and every later write of that instance (its state,
its heartbeat) must show it, as a job's lease token fences a job's writes. NULL:
no worker holds the instance (pending, stopped, or written by the master).
"""

from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('model_instances', sa.Column('worker_token', sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.drop_column('model_instances', 'worker_token')
