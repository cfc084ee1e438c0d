"""Rows from the local hot standby once it has replayed past an LSN; otherwise from the master.

Only for reads that tolerate lag (job specs, catalog rows): a standby is
asynchronous, so claims and locks never come here (docs/ARCHITECTURE.md, "Known traps").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import InterfaceError, OperationalError

from nexus.replicas.health import Cooldown
from nexus.replicas.lsn import parse_lsn
from nexus.replicas.stats import ReadStats

log = logging.getLogger(__name__)

_REPLAY_POSITION = text("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
PRIMARY = 1 << 64  # a promoted or mis-pointed "standby" (not in recovery) is current by definition
_FIRST_POLL_SECONDS = 0.002
_MAX_POLL_SECONDS = 0.05


def make_standby_engine(url: str) -> Engine:
    # A short connect timeout: a dead standby must cost little before the read goes to the master.
    # No pre-ping: the replay check is the first statement and fails just as fast on a dead
    # connection (SQLAlchemy then discards the pool), and the read falls back to the master.
    return create_engine(url, pool_size=4, max_overflow=8, pool_pre_ping=False, pool_recycle=1800,
                         connect_args={"connect_timeout": 2, "application_name": "nexus-replica-reads"})


def replay_position(conn: Connection) -> int:
    in_recovery, replayed = conn.execute(_REPLAY_POSITION).one()
    return parse_lsn(replayed) if in_recovery and replayed else PRIMARY


def wait_for_replay(conn: Connection, target: int, timeout: float) -> int:
    """Poll the standby until it has replayed up to `target` or `timeout` passes; returns its last position."""
    deadline = time.monotonic() + timeout
    delay = _FIRST_POLL_SECONDS
    while True:
        position = replay_position(conn)
        remaining = deadline - time.monotonic()
        if position >= target or remaining <= 0:
            return position
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_POLL_SECONDS)


def _fetch(conn: Connection, sql: str, params: dict | None) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(text(sql), params or {}).mappings()]


class StandbyReads:
    def __init__(self, master: Engine, standby: Engine | None, wait_seconds: float, cooldown: Cooldown,
                 stats: ReadStats):
        self.master = master
        self.standby = standby
        self.wait_seconds = wait_seconds
        self.cooldown = cooldown
        self.stats = stats
        # The highest WAL position the standby is known to have replayed. Replay only moves forward,
        # so a message at or below it needs no check: jobs submitted together carry one LSN, and
        # only the first of them pays the extra round trip.
        self._replayed = -1
        self._lock = threading.Lock()

    def forget_replayed(self) -> None:
        """Check the standby again before the next read (after an error, or to measure the check)."""
        with self._lock:
            self._replayed = -1

    def rows(self, sql: str, params: dict | None = None, after_lsn: str | None = None) -> tuple[list[dict], str]:
        """Run a read-only query; returns (rows, "replica" | "master").

        Without `after_lsn` nothing says how fresh the answer must be, so the
        master answers: a replica read is never older than what the caller saw.
        """
        if self._may_use_standby(after_lsn):
            rows = self._from_standby(sql, params, after_lsn)
            if rows is not None:
                return rows, "replica"
        with self.master.connect() as conn:
            rows = _fetch(conn, sql, params)
        self.stats.count("rows", "master")
        return rows, "master"

    def _may_use_standby(self, after_lsn: str | None) -> bool:
        if self.standby is None or after_lsn is None or not self.cooldown.available():
            return False
        try:
            parse_lsn(after_lsn)
        except ValueError:
            log.warning("ignoring a malformed LSN %r; reading from the master", after_lsn)
            return False
        return True

    def _from_standby(self, sql: str, params: dict | None, after_lsn: str) -> list[dict] | None:
        target = parse_lsn(after_lsn)
        try:
            with self.standby.connect() as conn:
                if target > self._replayed:
                    position = wait_for_replay(conn, target, self.wait_seconds)
                    with self._lock:
                        self._replayed = max(self._replayed, position)
                    if position < target:
                        self.stats.count("rows", "behind")
                        return None
                rows = _fetch(conn, sql, params)
        except (OperationalError, InterfaceError) as exc:
            log.warning("standby unavailable, reading from the master for %.0f s: %s", self.cooldown.seconds,
                        str(exc).splitlines()[0])
            self.cooldown.failed()
            self.forget_replayed()  # a restarted or re-cloned standby is checked afresh
            self.stats.count("rows", "error")
            return None
        self.stats.count("rows", "replica")
        return rows
