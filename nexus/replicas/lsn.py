"""PostgreSQL log sequence numbers: the master's position a reader must have seen.

An LSN is written `X/Y` (two hex halves of a 64-bit WAL position). A message
carries the master's WAL position taken *after* the submitting transaction
committed, so a standby that has replayed up to it has replayed that commit.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)


def parse_lsn(value: str) -> int:
    """'16/B374D848' -> 97500059720; ValueError on anything else."""
    high, sep, low = value.strip().partition("/")
    if not sep or not high or not low:
        raise ValueError(f"not an LSN: {value!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(position: int) -> str:
    if not 0 <= position < 1 << 64:
        raise ValueError(f"LSN out of range: {position}")
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def master_commit_lsn(engine: Engine) -> str | None:
    """The master's current WAL insert position, or None when it cannot be read."""
    with engine.connect() as conn:
        return commit_lsn(conn)


def commit_lsn(conn: Connection) -> str | None:
    """The master's current WAL insert position, or None when it cannot be read.

    Read after a commit (on the committing connection, to save a pool checkout): every commit
    made so far lies at or before it. The insert position, not the write position: a
    transaction committed with `synchronous_commit = off` may not be written yet, and a standby
    must still wait for it. None makes workers read from the master: always correct, only slower.
    """
    try:
        return conn.execute(_INSERT_LSN).scalar()
    except Exception as exc:  # a read-your-writes hint, never a reason to fail a submission
        log.warning("could not read the master's WAL position: %s", exc)
        return None


_INSERT_LSN = text("SELECT pg_current_wal_insert_lsn()::text")
