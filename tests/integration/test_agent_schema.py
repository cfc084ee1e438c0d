"""The node tables' models (nexus/db/nodes.py) match what migration 0002 creates; the trigger is in place."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

import nexus.db.nodes  # noqa: F401  (registers the node tables on the shared metadata)
from nexus.db.models import Base

OURS = ("nodes", "gpu_reservations")


def test_node_models_match_the_migrated_schema(services):
    with services.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        trigger = conn.execute(text("SELECT tgname FROM pg_trigger WHERE tgname = 'job_events_count_node_failures'"))
        assert trigger.scalar() == "job_events_count_node_failures"
    assert [change for change in diff if any(table in str(change) for table in OURS)] == []
