"""Retention: table sizes before and after deleting 100,000 finished jobs, and the time the passes take.

    python bench/retention.py [--jobs 100000] [--objects 1000] [--batch 500] [--active 1000]

On a fresh database (127.0.0.1): inserts `--jobs` finished jobs two days old with one
INSERT … SELECT generate_series (four in five `completion`, kept a day; the rest
`noop`, kept a month, so they stay), three events each, `--objects` of them with an
output object in S3, and `--active` queued jobs. Reports rows and pg_total_relation_size
of jobs and job_events before, after the passes and after VACUUM; the passes (batch
`--batch` roots, until one deletes nothing); one idle pass; and the /metrics job count
(active states by index + counters) against the old full GROUP BY over every row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text  # noqa: E402

from bench.common import bench_cluster, describe_ms  # noqa: E402
from nexus.api.metrics import ACTIVE_COUNTS, FINISHED_COUNTS  # noqa: E402
from nexus.db.engine import make_engine  # noqa: E402
from nexus.jobs.retention import retention_pass  # noqa: E402
from nexus.storage import make_object_store  # noqa: E402

OLD_FULL_COUNT = text("SELECT state, type, count(*) FROM jobs GROUP BY state, type")

_INSERT_FINISHED = text(
    """INSERT INTO jobs (id, type, queue, state, attempt, output_key, created_at, started_at, finished_at)
       SELECT gen_random_uuid(), CASE WHEN i % 5 = 0 THEN 'noop' ELSE 'completion' END, 'cpu_only', 'succeeded', 1,
              CASE WHEN i <= :objects * 5 / 4 AND i % 5 <> 0 THEN 'bench/' || i END,
              now() - interval '2 days', now() - interval '2 days', now() - interval '2 days' + i * interval '1 ms'
       FROM generate_series(1, :n) AS i""")
_INSERT_EVENTS = text(
    """INSERT INTO job_events (job_id, at, from_state, to_state, attempt)
       SELECT id, finished_at, f, t, 1 FROM jobs,
              (VALUES (NULL, 'queued'), ('queued', 'running'), ('running', 'succeeded')) AS e(f, t)""")
_INSERT_ACTIVE = text(
    "INSERT INTO jobs (id, type, queue, state) SELECT gen_random_uuid(), 'noop', 'cpu_only', 'queued' "
    "FROM generate_series(1, :n)")
_SIZES = text(
    """SELECT (SELECT count(*) FROM jobs), pg_total_relation_size('jobs'),
              (SELECT count(*) FROM job_events), pg_total_relation_size('job_events')""")


def sizes(engine, label: str) -> None:
    with engine.connect() as conn:
        jobs, jobs_bytes, events, events_bytes = conn.execute(_SIZES).one()
    print(f"{label:<22} jobs {jobs:>8,} rows {jobs_bytes / 2**20:8.1f} MiB   "
          f"job_events {events:>8,} rows {events_bytes / 2**20:8.1f} MiB")


def timed(engine, statement, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        with engine.connect() as conn:
            started = time.perf_counter()
            conn.execute(statement).all()
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--objects", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--active", type=int, default=1_000)
    args = parser.parse_args()
    with bench_cluster(retention_batch=args.batch) as (settings, _folder):
        engine = make_engine(settings.database_url)
        store = make_object_store(settings)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(_INSERT_FINISHED, {"n": args.jobs, "objects": args.objects})
            conn.execute(_INSERT_EVENTS)
            conn.execute(_INSERT_ACTIVE, {"n": args.active})
        with engine.connect() as conn:
            keys = [r[0] for r in conn.execute(text("SELECT output_key FROM jobs WHERE output_key IS NOT NULL"))]
        for key in keys:
            store.put_bytes(settings.bucket_outputs, key, b"{}")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobs"))
            conn.execute(text("VACUUM ANALYZE job_events"))
        print(f"inserted {args.jobs:,} finished jobs ({len(keys):,} with an output object), "
              f"{args.active:,} queued, in {time.perf_counter() - started:.1f} s")
        sizes(engine, "before")
        old_scrape, new_scrape = timed(engine, OLD_FULL_COUNT), timed(engine, ACTIVE_COUNTS) + timed(engine, FINISHED_COUNTS)
        print(f"/metrics job count: full GROUP BY {old_scrape * 1000:.2f} ms, "
              f"active by index + counters {new_scrape * 1000:.2f} ms")

        durations, deleted, objects = [], 0, 0
        while True:
            started = time.perf_counter()
            counts = retention_pass(engine, settings, store)
            durations.append(time.perf_counter() - started)
            if not counts["jobs_deleted"]:
                break
            deleted += counts["jobs_deleted"]
            objects += counts["objects_deleted"]
        idle = durations.pop()
        print(f"retention: {len(durations)} passes (batch {args.batch} roots per class) deleted {deleted:,} jobs, "
              f"{objects:,} objects in {sum(durations):.2f} s ({deleted / max(sum(durations), 1e-9):,.0f} jobs/s)")
        print(f"  per pass: {describe_ms(durations)}  max {max(durations) * 1000:.1f} ms")
        idle_passes = [idle] + [_idle_pass(engine, settings, store) for _ in range(20)]
        print(f"  idle pass (nothing to delete): {describe_ms(idle_passes)}")
        sizes(engine, "after passes")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobs"))
            conn.execute(text("VACUUM ANALYZE job_events"))
        sizes(engine, "after VACUUM")
        idle_passes = [_idle_pass(engine, settings, store) for _ in range(20)]
        print(f"  idle pass after VACUUM: {describe_ms(idle_passes)}")
        left = sum(1 for key in keys if store.exists(settings.bucket_outputs, key))
        print(f"output objects left: {left:,} of {len(keys):,}")
        old_scrape, new_scrape = timed(engine, OLD_FULL_COUNT), timed(engine, ACTIVE_COUNTS) + timed(engine, FINISHED_COUNTS)
        print(f"/metrics job count after: full GROUP BY {old_scrape * 1000:.2f} ms, "
              f"active by index + counters {new_scrape * 1000:.2f} ms")
        engine.dispose()


def _idle_pass(engine, settings, store) -> float:
    started = time.perf_counter()
    retention_pass(engine, settings, store)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
