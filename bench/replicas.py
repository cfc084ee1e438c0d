"""Local replicas: read latency from the node's replicas vs the master, and replica lag under a write load.

    python bench/replicas.py [--reads 400] [--seconds 8] [--writers 2]

Starts real servers on 127.0.0.1 (a PostgreSQL primary and its pg_basebackup standby,
a Redis master and replica, a master and a local S3 server) and measures, through
nexus.replicas (the code workers use):
  rows      a job-spec read: the master vs the standby (with the LSN check it needs)
  objects   a 1 MiB and a 16 MiB object: the master vs the local copy (ETag checked)
  lag       while writers load the primary (and Redis), how long a committed row takes
            to become visible on the standby, the standby's lag in WAL bytes, and how
            long a Redis write takes to reach the replica
On one machine the master is as near as the replica, so the read figures show the
replica path's own overhead; across a network each master read also pays the
round trips to the master that a local read avoids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text  # noqa: E402

from bench.common import describe_ms, percentile  # noqa: E402
from nexus.config import Settings  # noqa: E402
from nexus.db.engine import get_engine  # noqa: E402
from nexus.localservers import RedisServer, S3Server  # noqa: E402
from nexus.replicas import make_node_reads, master_commit_lsn, parse_lsn  # noqa: E402
from nexus.storage import make_object_store  # noqa: E402
from tests.replicas_support import start_replica_cluster  # noqa: E402
from tests.support import S3_ACCESS, S3_SECRET  # noqa: E402

SPEC_SQL = "SELECT payload FROM bench_specs WHERE id = :id"


def timed(fn, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def bench_rows(cluster, reads, count: int) -> dict:
    engine = get_engine(cluster.settings)
    payload = json.dumps({"prompt": "x" * 2000})
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_specs (id int PRIMARY KEY, payload jsonb)"))
        conn.execute(text("INSERT INTO bench_specs SELECT g, CAST(:p AS jsonb) FROM generate_series(1, 1000) g "
                          "ON CONFLICT DO NOTHING"), {"p": payload})
    lsn = master_commit_lsn(engine)
    cluster.wait_for_standby(lsn)
    ids = [random.randint(1, 1000) for _ in range(count)]
    for source in ("master", "replica"):  # warm both pools
        reads.rows(SPEC_SQL, {"id": 1}, after_lsn=lsn if source == "replica" else None)
    master, checked, known = [], [], []
    for row_id in ids:  # interleaved, so all three see the same machine load
        master += timed(lambda row_id=row_id: reads.rows(SPEC_SQL, {"id": row_id}), 1)
        reads.standby.forget_replayed()  # as for a message with a newer LSN than any seen: check first
        checked += timed(lambda row_id=row_id: reads.rows(SPEC_SQL, {"id": row_id}, after_lsn=lsn), 1)
        # as for the other jobs of one submission: the LSN is already known to be replayed
        known += timed(lambda row_id=row_id: reads.rows(SPEC_SQL, {"id": row_id}, after_lsn=lsn), 1)
    return {"master": master, "checked": checked, "known": known, "served": reads.stats.snapshot()}


def bench_objects(cluster, reads, count: int) -> dict:
    master_store = make_object_store(cluster.settings)
    results = {}
    for size in (1 << 20, 16 << 20):
        key = f"bench/{size}"
        etag = master_store.put_bytes(cluster.settings.bucket_inputs, key, os.urandom(size))
        reads.object_with_source(cluster.settings.bucket_inputs, key)  # fills the local copy
        series = {"master": [], "local, ETag in message": [], "local, ETag from a master HEAD": []}
        for _ in range(max(5, count // (size >> 20) // 4)):  # interleaved, as above
            series["master"] += timed(lambda key=key: master_store.get_bytes(cluster.settings.bucket_inputs, key), 1)
            series["local, ETag in message"] += timed(
                lambda key=key, etag=etag: reads.object_with_source(cluster.settings.bucket_inputs, key, etag), 1)
            series["local, ETag from a master HEAD"] += timed(
                lambda key=key: reads.object_with_source(cluster.settings.bucket_inputs, key), 1)
        results[f"{size >> 20} MiB"] = series
    return results


class Writers:
    """Threads committing 10-row batches of 2 KB rows to the primary, and pipelined 1 KB SETs to Redis."""

    def __init__(self, cluster, threads: int):
        self.cluster, self.threads = cluster, threads
        self.stop = threading.Event()
        self.rows = 0
        self.redis_sets = 0
        self._lock = threading.Lock()

    def _pg(self) -> None:
        engine = get_engine(self.cluster.settings)
        payload = json.dumps({"prompt": "y" * 2000})
        while not self.stop.is_set():
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO bench_load (payload) SELECT CAST(:p AS jsonb) "
                                  "FROM generate_series(1, 10)"), {"p": payload})
            with self._lock:
                self.rows += 10

    def _redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.cluster.settings.redis_url)
        value = b"z" * 1024
        while not self.stop.is_set():
            pipe = client.pipeline(transaction=False)
            for i in range(50):
                pipe.set(f"bench:load:{i}", value)
            pipe.execute()
            self.redis_sets += 50

    def __enter__(self):
        with get_engine(self.cluster.settings).begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS bench_load (id bigserial PRIMARY KEY, payload jsonb)"))
        self._threads = [threading.Thread(target=self._pg, daemon=True) for _ in range(self.threads)]
        self._threads.append(threading.Thread(target=self._redis, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self._threads:
            thread.join(10)


def bench_lag(cluster, seconds: float, writers: int) -> dict:
    engine = get_engine(cluster.settings)
    standby = cluster.standby.connect("nexus")
    standby.autocommit = True
    import redis

    master_redis = redis.Redis.from_url(cluster.settings.redis_url)
    replica_redis = redis.Redis.from_url(cluster.settings.replica_redis_url)
    visible, byte_lag, redis_lag = [], [], []
    with Writers(cluster, writers) as load, standby.cursor() as cur:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO bench_load (payload) VALUES ('{}')"))
            committed = time.perf_counter()
            lsn = master_commit_lsn(engine)
            while True:
                cur.execute("SELECT pg_last_wal_replay_lsn()::text")
                if parse_lsn(cur.fetchone()[0]) >= parse_lsn(lsn):
                    break
                time.sleep(0.0005)
            visible.append(time.perf_counter() - committed)
            cur.execute("SELECT pg_last_wal_replay_lsn()::text")
            byte_lag.append(parse_lsn(master_commit_lsn(engine)) - parse_lsn(cur.fetchone()[0]))
            marker = str(time.perf_counter())
            master_redis.set("bench:marker", marker)
            sent = time.perf_counter()
            while replica_redis.get("bench:marker") != marker.encode():
                time.sleep(0.0002)
            redis_lag.append(time.perf_counter() - sent)
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        rows_per_s, sets_per_s = load.rows / elapsed, load.redis_sets / elapsed
    standby.close()
    return {"visible": visible, "byte_lag": byte_lag, "redis": redis_lag, "rows_per_s": rows_per_s,
            "sets_per_s": sets_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--writers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nexus-bench-replicas-") as tmp:
        folder = Path(tmp)
        with RedisServer(folder / "redis") as redis_master, \
                S3Server(folder / "s3", access_key=S3_ACCESS, secret_key=S3_SECRET) as s3:
            base = Settings(redis_url=redis_master.url, s3_endpoint=s3.endpoint, s3_access_key=S3_ACCESS,
                            s3_secret_key=S3_SECRET, data_dir=folder / "data")
            cluster = start_replica_cluster(folder, base, redis_master)
            try:
                report(cluster, args)
            finally:
                cluster.stop()


def report(cluster, args) -> None:
    reads = make_node_reads(cluster.settings, get_engine(cluster.settings))
    rows = bench_rows(cluster, reads, args.reads)
    print(f"rows (job spec by id, {args.reads} reads each)")
    base = percentile(rows["master"], 50)
    print(f"  master                          {describe_ms(rows['master'])}")
    print(f"  standby, new LSN (check first)  {describe_ms(rows['checked'])}"
          f"  p50 {percentile(rows['checked'], 50) / base:.2f}x master")
    print(f"  standby, LSN already replayed   {describe_ms(rows['known'])}"
          f"  p50 {percentile(rows['known'], 50) / base:.2f}x master")
    print(f"  served: {rows['served']}")
    for size, series in bench_objects(cluster, reads, args.reads).items():
        print(f"object {size} ({len(series['master'])} reads each)")
        for name, values in series.items():
            print(f"  {name:30s} {describe_ms(values)}")
    lag = bench_lag(cluster, args.seconds, args.writers)
    print(f"lag under load: {lag['rows_per_s']:,.0f} rows/s of 2 KB into the primary ({args.writers} writers), "
          f"{lag['sets_per_s']:,.0f} SET/s of 1 KB into Redis; {len(lag['visible'])} probes")
    print(f"  commit -> visible on standby   {describe_ms(lag['visible'])}  max {max(lag['visible']) * 1000:.2f} ms")
    kib = [b / 1024 for b in lag["byte_lag"]]
    print(f"  standby WAL lag                p50 {percentile(kib, 50):7.1f} KiB  max {max(kib):7.1f} KiB")
    print(f"  SET -> visible on replica      {describe_ms(lag['redis'])}  max {max(lag['redis']) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
