"""One engine per process, created lazily (after any fork) from Settings."""

from __future__ import annotations

import threading

from sqlalchemy import URL, Engine, create_engine

from nexus.config import Settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def make_engine(url: str | URL, pool_size: int = 10, **options) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=20,
        # No pre-ping: it costs a round trip on every checkout (~0.4 ms, a third of a job's database
        # time). After a PostgreSQL restart the first statement on a dead connection fails instead;
        # SQLAlchemy then invalidates the whole pool, and every caller already treats
        # OperationalError as "try again" (503 in the API, retries in workers and the reconciler).
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": "nexus"},
        **options,
    )


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for the master database."""
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = _engines[settings.database_url] = make_engine(settings.database_url)
        return engine


def autocommit(engine: Engine) -> Engine:
    """A process-wide engine on the same database whose connections commit each statement on its own.

    For the one-statement writes on the dispatch path (insert, claim, complete): in a transaction
    psycopg2 sends BEGIN and COMMIT as round trips of their own, three per write instead of one.
    A pool of its own, set to autocommit once per connection: switching a shared pool's connections
    per checkout (`execution_options(isolation_level=...)`) costs more than the round trips saved.
    """
    key = "autocommit:" + engine.url.render_as_string(hide_password=False)
    with _lock:
        writes = _engines.get(key)
        if writes is None:
            writes = _engines[key] = make_engine(engine.url, isolation_level="AUTOCOMMIT",
                                                 pool_reset_on_return=None)  # never a transaction to undo
        return writes


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
