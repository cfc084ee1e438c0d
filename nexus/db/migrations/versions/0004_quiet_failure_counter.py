"""The node failure counter writes only when the streak changes.

Revision ID: 0004
Revises: 0002, 0003 (also merging the two branches)

0002's trigger reset `consecutive_failures` to 0 on every successful attempt,
rewriting the node's row (and taking its row lock until commit) for each job: a
node's concurrent completions queued behind one another, and each left a dead
row version behind. A success now writes only when it ends a streak.
"""

from alembic import op

revision = '0004'
down_revision = ('0002', '0003')
branch_labels = None
depends_on = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION nexus_count_node_failures() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE nodes SET consecutive_failures =
        CASE WHEN NEW.to_state = 'succeeded' THEN 0 ELSE consecutive_failures + 1 END
    WHERE name = NEW.node AND state <> 'removed'
      AND (NEW.to_state <> 'succeeded' OR consecutive_failures <> 0);
    RETURN NULL;
END $$;
"""

_PREVIOUS = """
CREATE OR REPLACE FUNCTION nexus_count_node_failures() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE nodes SET consecutive_failures =
        CASE WHEN NEW.to_state = 'succeeded' THEN 0 ELSE consecutive_failures + 1 END
    WHERE name = NEW.node AND state <> 'removed';
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.execute(_FUNCTION)


def downgrade() -> None:
    op.execute(_PREVIOUS)
