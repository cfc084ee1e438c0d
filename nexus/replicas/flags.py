"""Read-only flags (drain requests, kill switches) from the node's Redis replica while its link is up.

Redis replication is asynchronous and has no LSN to wait for, so the replica
answers only while its link to the master is up and was heard from within
`max_lag_seconds`; otherwise the master answers. Never a lock or a counter.
"""

from __future__ import annotations

import logging
import time

import redis

from nexus.replicas.health import Cooldown
from nexus.replicas.stats import ReadStats

log = logging.getLogger(__name__)
LINK_CHECK_SECONDS = 1.0  # INFO replication is asked at most this often


class FlagReads:
    def __init__(self, master: redis.Redis, replica: redis.Redis | None, max_lag_seconds: float,
                 cooldown: Cooldown, stats: ReadStats):
        self.master = master
        self.replica = replica
        self.max_lag_seconds = max_lag_seconds
        self.cooldown = cooldown
        self.stats = stats
        self._link_checked_at = float("-inf")
        self._link_fresh = False

    def get(self, key: str) -> tuple[bytes | None, str]:
        """(value, "replica" | "master")."""
        if self.replica is not None and self.cooldown.available():
            try:
                if self._replica_fresh():
                    value = self.replica.get(key)
                    self.stats.count("flags", "replica")
                    return value, "replica"
                self.stats.count("flags", "behind")
            except redis.RedisError as exc:
                log.warning("redis replica unavailable, reading flags from the master for %.0f s: %s",
                            self.cooldown.seconds, exc)
                self.cooldown.failed()
                self._link_checked_at = float("-inf")
                self.stats.count("flags", "error")
        value = self.master.get(key)
        self.stats.count("flags", "master")
        return value, "master"

    def _replica_fresh(self) -> bool:
        now = time.monotonic()
        if now - self._link_checked_at >= LINK_CHECK_SECONDS:
            info = self.replica.info("replication")
            self._link_fresh = link_is_fresh(info, self.max_lag_seconds)
            self._link_checked_at = now
        return self._link_fresh


def link_is_fresh(info: dict, max_lag_seconds: float) -> bool:
    """From INFO replication: a replica whose link is up and whose master spoke recently."""
    if info.get("role") not in ("slave", "replica"):
        return info.get("role") == "master"  # pointed at a master itself: current by definition
    return info.get("master_link_status") == "up" and \
        0 <= int(info.get("master_last_io_seconds_ago", -1)) <= max_lag_seconds
