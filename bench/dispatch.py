"""Dispatch overhead: bare Celery vs a Nexus job, on the same Redis and the same worker pool.

    python bench/dispatch.py [--jobs 2000] [--latency 300] [--bulk 10000]

Measures, in one run:
  latency     sequential round trips: bare `delay().get()` vs Nexus submit -> completion notice
              (in-process Submitter) and through the HTTP API (POST, then GET ?wait=; and one
              POST ?wait= that answers with the finished job)
  throughput  N jobs sent one by one, time until the last one finished, for each
  bulk        submit_many of 10,000 jobs in one transaction (library and HTTP), against
              bare send_task of as many messages on one producer
and prints each Nexus figure as a ratio against the bare baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.common import bench_cluster, describe_ms, percentile  # noqa: E402
from nexus.jobs.reconciler import queue_depth  # noqa: E402
from nexus.jobs.submit import Submitter  # noqa: E402
from nexus.services import Services  # noqa: E402
from tests.support import NexusProcess, start_api  # noqa: E402

CONCURRENCY = 4


def start_bench_worker(settings, folder: Path) -> NexusProcess:
    import subprocess

    # "worker": the worker node's own settings (its database role), as a real worker runs.
    worker = NexusProcess(settings, ["worker"], folder, "bench-worker", {"NEXUS_NODE_NAME": "bench-worker"})
    with open(worker.log_path, "ab") as out:
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.dispatch_worker", "worker", "-Q", "bare,cpu_only",
             "-P", "threads", "-c", str(CONCURRENCY), "--without-gossip", "--without-mingle", "--loglevel=WARNING",
             "-n", "bench@%h"],
            env={**worker.env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    return worker


class BareTask:
    """The client side of the bare baseline: plain send_task and AsyncResult.get()."""

    def __init__(self, celery):
        self.celery = celery

    def apply_async(self, args, queue):
        return self.celery.send_task("bench.bare_noop", args=args, queue=queue)


class CompletionWatcher:
    """Waits for Nexus completion notices (the same Redis channel the API's long-poll uses)."""

    def __init__(self, services: Services):
        self.pubsub = services.redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("nexus:job:*")
        self.done: set[str] = set()

    def wait(self, job_ids: set[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not job_ids <= self.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(job_ids - self.done)} jobs did not finish")
            message = self.pubsub.get_message(timeout=1.0)
            if message and json.loads(message["data"])["state"] == "succeeded":
                self.done.add(message["channel"].decode().rsplit(":", 1)[1])


def bare_latency(bare, n: int) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        bare.apply_async(args=[i], queue="bare").get(timeout=30)
        times.append(time.perf_counter() - started)
    return times


def nexus_latency(services: Services, watcher: CompletionWatcher, n: int) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        [(row, _)] = services.submitter.submit_many([{"type": "noop", "payload": {"echo": i}}], tenant="bench")
        watcher.wait({str(row.id)})
        times.append(time.perf_counter() - started)
    return times


def http_latency(url: str, token: str, n: int, one_request: bool = False) -> list[float]:
    """POST, then GET ?wait= until final; or, with `one_request`, one POST ?wait= answering with the finished job."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    times = []
    for i in range(n):
        body = {"type": "noop", "payload": {"echo": i}}
        started = time.perf_counter()
        if one_request:
            done = session.post(f"{url}/api/v1/jobs", params={"wait": 30}, json=body, timeout=40).json()
        else:
            job = session.post(f"{url}/api/v1/jobs", json=body, timeout=30).json()
            done = session.get(f"{url}/api/v1/jobs/{job['id']}", params={"wait": 30}, timeout=40).json()
        assert done["state"] == "succeeded", done
        times.append(time.perf_counter() - started)
    return times


def bare_throughput(bare, n: int) -> float:
    started = time.perf_counter()
    results = [bare.apply_async(args=[i], queue="bare") for i in range(n)]
    for result in results:
        result.get(timeout=120)
    return n / (time.perf_counter() - started)


def nexus_throughput(services: Services, watcher: CompletionWatcher, n: int) -> float:
    started = time.perf_counter()
    ids = set()
    for i in range(n):
        [(row, _)] = services.submitter.submit_many([{"type": "noop", "payload": {"echo": i}}], tenant="bench")
        ids.add(str(row.id))
    watcher.wait(ids, timeout=300)
    return n / (time.perf_counter() - started)


def bare_bulk_rate(services: Services, n: int) -> float:
    """Celery's quickest way to send many tasks: send_task in a loop on one producer (no database).
    Sent to a queue no worker reads, then dropped, as the Nexus bulk jobs are."""
    started = time.perf_counter()
    with services.celery.producer_or_acquire() as producer:
        for i in range(n):
            services.celery.send_task("bench.bare_noop", args=[i], queue="bare_bulk", producer=producer)
    rate = n / (time.perf_counter() - started)
    services.redis.delete(*services.redis.keys("bare_bulk*"))
    return rate


def bulk_rate(services: Services, n: int) -> float:
    """Submit and publish `n` jobs at once. Without a tenant's share of the queue (nexus.jobs.fairshare),
    which would publish only the first few and hold the rest as rows: like the bare run, every message goes out."""
    submitter = Submitter(services.settings.model_copy(update={"max_broker_messages_per_tenant": 0}),
                          services.engine, services.celery)
    jobs = [{"type": "noop", "payload": {"echo": i}, "requirements": {"tier": "gpu_peer"}} for i in range(n)]
    started = time.perf_counter()
    submitter.submit_many(jobs, tenant="bench")
    rate = n / (time.perf_counter() - started)
    assert queue_depth(services.redis, "gpu_peer") >= n
    services.redis.delete(*[k for k in services.redis.keys("gpu_peer*")])
    return rate


def http_bulk_rate(url: str, token: str, n: int) -> float:
    body = {"jobs": [{"type": "noop", "payload": {"echo": i}, "requirements": {"tier": "gpu_peer"}} for i in range(n)]}
    started = time.perf_counter()
    response = requests.post(f"{url}/api/v1/jobs/bulk", json=body, headers={"Authorization": f"Bearer {token}"},
                             timeout=300)
    assert response.status_code == 201, response.text[:300]
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per throughput run")
    parser.add_argument("--latency", type=int, default=300, help="sequential round trips per latency run")
    parser.add_argument("--bulk", type=int, default=10_000, help="jobs in the bulk submit")
    args = parser.parse_args()

    with bench_cluster() as (settings, folder):
        services = Services(settings)
        worker = start_bench_worker(settings, folder)
        api, url = start_api(settings, folder)
        try:
            bare = BareTask(services.celery)
            bare.apply_async(args=["warm-up"], queue="bare").get(timeout=60)  # the worker is up
            watcher = CompletionWatcher(services)
            nexus_latency(services, watcher, 20)  # warm the pools
            http_latency(url, settings.admin_token, 20)

            lat_bare = bare_latency(bare, args.latency)
            lat_nexus = nexus_latency(services, watcher, args.latency)
            lat_http = http_latency(url, settings.admin_token, args.latency)
            lat_run = http_latency(url, settings.admin_token, args.latency, one_request=True)
            tput_bare = bare_throughput(bare, args.jobs)
            tput_nexus = nexus_throughput(services, watcher, args.jobs)
            bulk_bare = bare_bulk_rate(services, args.bulk)
            bulk = bulk_rate(services, args.bulk)
            bulk_http = http_bulk_rate(url, settings.admin_token, args.bulk)
        finally:
            api.stop()
            worker.stop()

    p50 = lambda values: percentile(values, 50)  # noqa: E731
    print(f"\nNexus dispatch benchmark (1 worker, threads pool x{CONCURRENCY}, Redis + PostgreSQL on 127.0.0.1)")
    print(f"  latency  bare Celery delay().get()   {describe_ms(lat_bare)}")
    print(f"  latency  Nexus noop (library)        {describe_ms(lat_nexus)}")
    print(f"  latency  Nexus noop (HTTP API)       {describe_ms(lat_http)}")
    print(f"  latency  Nexus noop (HTTP, one POST) {describe_ms(lat_run)}")
    print(f"  overhead p50 library {1000 * (p50(lat_nexus) - p50(lat_bare)):+.2f} ms "
          f"(ratio {p50(lat_nexus) / p50(lat_bare):.2f}x), HTTP {1000 * (p50(lat_http) - p50(lat_bare)):+.2f} ms "
          f"(ratio {p50(lat_http) / p50(lat_bare):.2f}x), HTTP one POST {1000 * (p50(lat_run) - p50(lat_bare)):+.2f} ms "
          f"(ratio {p50(lat_run) / p50(lat_bare):.2f}x)")
    print(f"  throughput bare {tput_bare:8.0f} jobs/s   Nexus {tput_nexus:8.0f} jobs/s   "
          f"ratio {tput_nexus / tput_bare:.2f}x")
    print(f"  bulk submit  bare send_task {bulk_bare:8.0f} jobs/s   Nexus library {bulk:8.0f} jobs/s "
          f"(ratio {bulk / bulk_bare:.2f}x)   HTTP {bulk_http:8.0f} jobs/s   ({args.bulk} jobs)")


if __name__ == "__main__":
    main()
