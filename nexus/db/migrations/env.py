"""Alembic environment: the URL comes from the caller (nexus.db.migrate), never from alembic.ini."""

from alembic import context

from nexus.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
