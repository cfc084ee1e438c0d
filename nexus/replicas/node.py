"""A worker node's read paths, built once per process from Settings."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from sqlalchemy import Engine

from nexus.config import Settings
from nexus.replicas.flags import FlagReads
from nexus.replicas.health import Cooldown
from nexus.replicas.objects import ReplicatedObjectStore, make_local_client
from nexus.replicas.standby import StandbyReads, make_standby_engine
from nexus.replicas.stats import ReadStats
from nexus.storage import ObjectStore, make_object_store


@dataclass
class NodeReads:
    """Where this node reads from: `rows` (PostgreSQL), `store` (objects), `flag` (Redis)."""

    standby: StandbyReads
    store: ObjectStore
    flags: FlagReads | None
    stats: ReadStats

    def rows(self, sql: str, params: dict | None = None, after_lsn: str | None = None) -> tuple[list[dict], str]:
        return self.standby.rows(sql, params, after_lsn)

    def flag(self, key: str) -> bytes | None:
        if self.flags is None:
            raise RuntimeError("no Redis connection was given to these NodeReads")
        return self.flags.get(key)[0]

    def object_with_source(self, bucket: str, key: str, etag: str | None = None) -> tuple[bytes, str]:
        return object_with_source(self.store, bucket, key, etag)

    def job_store(self, leased: ObjectStore) -> ObjectStore:
        """One job's way to the master (its lease), behind this node's local object store when it has one."""
        return self.store.over(leased) if isinstance(self.store, ReplicatedObjectStore) else leased


def object_with_source(store: ObjectStore, bucket: str, key: str, etag: str | None = None) -> tuple[bytes, str]:
    """(bytes, "local" | "master"): where a read through `store` was answered from."""
    if isinstance(store, ReplicatedObjectStore):
        return store.get_bytes_with_source(bucket, key, etag)
    return store.get_bytes(bucket, key), "master"


def make_read_store(settings: Settings, master_store: ObjectStore | None = None,
                    stats: ReadStats | None = None) -> ObjectStore:
    """The master's store, reading through the local S3 when `replica_s3_endpoint` is set."""
    master_store = master_store or make_object_store(settings)
    if not settings.replica_s3_endpoint:
        return master_store
    local = make_local_client(settings.replica_s3_endpoint, settings.replica_s3_access_key or settings.s3_access_key,
                              settings.replica_s3_secret_key or settings.s3_secret_key, settings.s3_secure,
                              settings.s3_region)
    return ReplicatedObjectStore(master_store, local, Cooldown(settings.replica_retry_after_seconds),
                                 stats or ReadStats())


def make_node_reads(settings: Settings, master_engine: Engine, master_redis: redis.Redis | None = None,
                    master_store: ObjectStore | None = None) -> NodeReads:
    stats = ReadStats()
    retry_after = settings.replica_retry_after_seconds
    standby_engine = make_standby_engine(settings.replica_database_url) if settings.replica_database_url else None
    standby = StandbyReads(master_engine, standby_engine, settings.replica_wait_seconds, Cooldown(retry_after), stats)
    flags = None
    if master_redis is not None:
        replica_redis = redis.Redis.from_url(settings.replica_redis_url, socket_timeout=1, socket_connect_timeout=1) \
            if settings.replica_redis_url else None
        flags = FlagReads(master_redis, replica_redis, settings.replica_max_flag_lag_seconds, Cooldown(retry_after),
                          stats)
    return NodeReads(standby, make_read_store(settings, master_store, stats), flags, stats)
