"""Broker messages held by a backlog that waits on a queue nobody consumes.

    python bench/requeue_backlog.py [--jobs 500] [--seconds 120] [--requeue 5] [--interval 2]

Submits `--jobs` jobs to `gpu_peer` (no worker consumes it), runs the real reconciler
every `--interval` seconds for `--seconds`, and prints the messages in the broker every
10 s. `--requeue` feeds the age rule of earlier versions (NEXUS_REQUEUE_AFTER_SECONDS),
which re-published every waiting job that often; the evidence rule ignores it.
Target: messages stay at the number of jobs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_cluster  # noqa: E402
from nexus.jobs.reconciler import Reconciler, queue_depth  # noqa: E402
from nexus.services import Services  # noqa: E402

QUEUE = "gpu_peer"


def messages(services: Services) -> int:
    """Waiting in the queue's lists plus held unacknowledged (none here: nobody consumes)."""
    return queue_depth(services.redis, QUEUE) + services.redis.hlen("unacked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--requeue", type=float, default=5)
    parser.add_argument("--interval", type=float, default=2)
    args = parser.parse_args()
    with bench_cluster(requeue_after_seconds=args.requeue, reconcile_interval_seconds=args.interval) as (settings, _):
        services = Services(settings)
        reconciler = Reconciler(settings, services.engine, services.celery, services.redis)
        reconciler.run_once()  # a running deployment: the reconciler was there before the backlog
        services.submitter.submit_many([{"type": "noop", "requirements": {"tier": "gpu_peer"}}] * args.jobs,
                                       tenant="bench")
        stop = threading.Event()
        thread = threading.Thread(target=reconciler.run_forever, args=(stop,), daemon=True)
        began = time.monotonic()
        thread.start()
        while (elapsed := time.monotonic() - began) < args.seconds:
            print(f"t={elapsed:5.0f}s  messages={messages(services)}", flush=True)
            time.sleep(min(10, args.seconds - elapsed))
        stop.set()
        thread.join()
        count = messages(services)
        print(f"{args.jobs} jobs waited {args.seconds:.0f}s (reconcile every {args.interval}s, requeue "
              f"{args.requeue}s): {count} broker messages, {count / args.jobs:.2f} per job")


if __name__ == "__main__":
    main()
