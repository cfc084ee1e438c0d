"""Broker messages held by a backlog that waits on a queue nobody consumes.

    python bench/requeue_backlog.py [--jobs 500] [--seconds 120] [--requeue 5] [--interval 2]

Submits `--jobs` jobs to `gpu_peer` (no worker consumes it), runs the real reconciler
every `--interval` seconds for `--seconds`, and prints the messages in the broker every
10 s. `--requeue` feeds the age rule of earlier versions (NEXUS_REQUEUE_AFTER_SECONDS),
which re-published every waiting job that often; the evidence rule ignores it.
`--tenants` spreads the jobs over that many tenants: each has at most its share of the queue
(NEXUS_MAX_BROKER_MESSAGES_PER_TENANT) published, the rest wait as held rows with no message.
Target: messages stay at the number of jobs with a message out (1.00 per published job), and the
held jobs have none.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text  # noqa: E402

from bench.common import bench_cluster  # noqa: E402
from nexus.jobs import fairshare  # noqa: E402
from nexus.jobs.reconciler import Reconciler, queue_depth  # noqa: E402
from nexus.services import Services  # noqa: E402

QUEUE = "gpu_peer"


def published_jobs(services: Services) -> int:
    with services.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM jobs j WHERE queue = :q AND {fairshare.published('j')}"),
                            {"q": QUEUE}).scalar_one()


def messages(services: Services) -> int:
    """Waiting in the queue's lists plus held unacknowledged (none here: nobody consumes)."""
    return queue_depth(services.redis, QUEUE) + services.redis.hlen("unacked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--requeue", type=float, default=5)
    parser.add_argument("--interval", type=float, default=2)
    parser.add_argument("--tenants", type=int, default=1)
    args = parser.parse_args()
    with bench_cluster(requeue_after_seconds=args.requeue, reconcile_interval_seconds=args.interval) as (settings, _):
        services = Services(settings)
        reconciler = Reconciler(settings, services.engine, services.celery, services.redis)
        reconciler.run_once()  # a running deployment: the reconciler was there before the backlog
        for tenant in range(args.tenants):
            share = args.jobs // args.tenants + (tenant < args.jobs % args.tenants)
            services.submitter.submit_many([{"type": "noop", "requirements": {"tier": "gpu_peer"}}] * share,
                                           tenant=f"bench-{tenant}")
        stop = threading.Event()
        thread = threading.Thread(target=reconciler.run_forever, args=(stop,), daemon=True)
        began = time.monotonic()
        thread.start()
        while (elapsed := time.monotonic() - began) < args.seconds:
            print(f"t={elapsed:5.0f}s  messages={messages(services)}  published jobs={published_jobs(services)}",
                  flush=True)
            time.sleep(min(10, args.seconds - elapsed))
        stop.set()
        thread.join()
        count, published = messages(services), published_jobs(services)
        print(f"{args.jobs} jobs of {args.tenants} tenant(s) waited {args.seconds:.0f}s (reconcile every "
              f"{args.interval}s, requeue {args.requeue}s): {count} broker messages for {published} jobs with a "
              f"message out ({count / max(1, published):.2f} per job), {args.jobs - published} held without one; "
              f"{count / args.jobs:.2f} messages per waiting job")


if __name__ == "__main__":
    main()
