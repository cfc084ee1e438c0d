"""Proof throughput: the same nonce range proven by 1 and by 2 `nexus worker` processes.

    python bench/proof.py [--nonces 98304] [--segment-size 4096] [--preset tiny] [--max-workers 2] [--repeat 1]

Starts its own Redis, S3 and PostgreSQL database (bench/common.py), then for
1..max-workers real worker processes submits one `proof` job over the same
range and seed and times it from submission to the receipt. Each worker runs
one job at a time (NEXUS_WORKER_CONCURRENCY=1) with one torch thread
(NEXUS_PROOF_TORCH_THREADS=1), so N workers use N cores and the comparison
measures the task graph, not torch's own threading. The proof job waits on
one of the workers and proves segments itself meanwhile (nexus/proofs/jobs.py),
so with one worker it proves everything, with two it shares the work.
The bare baseline proves the same segments in 1 and 2 plain processes (a
multiprocessing pool, 1 torch thread each, no Nexus at all), measured right
before each Nexus run: its speed-up is what the machine gives at that moment,
so the Nexus speed-up is printed against it as well. With --repeat the
configurations alternate, so that other load on the machine falls on all alike.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.common import bench_cluster  # noqa: E402
from nexus.services import Services  # noqa: E402
from tests.support import start_worker  # noqa: E402

WORKER_ENV = {"NEXUS_WORKER_CONCURRENCY": "1", "NEXUS_PROOF_TORCH_THREADS": "1", "NEXUS_WORKER_TIER": "cpu_only"}
SEED = "bench-proof"


def run_proof(services: Services, request: dict, timeout: float) -> dict:
    """Submit one proof and wait for its row to be final; returns the row and the wall time."""
    started = time.perf_counter()
    [(job, _)] = services.submitter.submit_many([{"type": "proof", "payload": request}], tenant="bench")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with services.engine.connect() as conn:
            row = conn.execute(text("SELECT state, result, error FROM jobs WHERE id = :id"),
                               {"id": job.id}).mappings().one()
        if row["state"] in ("succeeded", "failed", "cancelled"):
            return {"id": job.id, **row, "wall_seconds": time.perf_counter() - started}
        time.sleep(0.2)
    raise TimeoutError(f"proof {job['id']} not finished in {timeout:.0f} s")


def segments_of(services: Services, proof_id) -> tuple[Counter, float]:
    """Segments per node, and the seconds spent proving them (inside the handlers)."""
    with services.engine.connect() as conn:
        rows = conn.execute(text("SELECT node, (result->>'elapsed_seconds')::float FROM jobs "
                                 "WHERE parent_id = :id AND type = 'proof_segment'"), {"id": proof_id}).all()
    return Counter(node for node, _ in rows), sum(seconds for _, seconds in rows)


def cpu_seconds(processes) -> float:
    """CPU time (user + system) the worker processes have used so far."""
    total = 0.0
    for process in processes:
        times = psutil.Process(process.process.pid).cpu_times()
        total += times.user + times.system
    return total


def _bare_init() -> None:
    import torch

    torch.set_num_threads(1)
    import nexus.proofs.compute  # noqa: F401  (torch and the model code, imported before the clock starts)


def _bare_ready(_: int) -> None:
    time.sleep(0.3)  # long enough that every pool process takes one: all started and initialised


def _bare_prove(segment: dict) -> None:
    from nexus.proofs.base import Segment
    from nexus.proofs.registry import get_kind

    segment = Segment.from_dict(segment)
    get_kind(segment.kind).prove(segment, "bare")


def measure_bare(workers: int, request: dict) -> dict:
    """The same segments in `workers` plain processes: what the machine gives without Nexus."""
    from nexus.proofs.receipts import split_range
    from nexus.proofs.requests import parse_proof_request

    segments = [s.to_dict() for s in split_range(parse_proof_request(request))]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_bare_init) as pool:
        pool.map(_bare_ready, range(workers), chunksize=1)
        children = [psutil.Process(child.pid) for child in multiprocessing.active_children()]
        cpu_before = sum(sum(c.cpu_times()[:2]) for c in children)
        started = time.perf_counter()
        for _ in pool.imap_unordered(_bare_prove, segments, chunksize=1):
            pass
        wall = time.perf_counter() - started
        cpu_used = sum(sum(c.cpu_times()[:2]) for c in children) - cpu_before
    nonces = request["nonce_end"] - request["nonce_start"]
    return {"workers": workers, "wall": wall, "rate": nonces / wall, "core": cpu_used / (wall * workers),
            "load": os.getloadavg()[0], "per_cpu_second": nonces / cpu_used}


def measure(settings, folder: Path, services: Services, workers: int, request: dict, timeout: float) -> dict:
    processes = [start_worker(settings, folder, name=f"prover-{workers}-{i}", extra_env=WORKER_ENV)
                 for i in range(workers)]
    try:
        cpu_before = cpu_seconds(processes)
        outcome = run_proof(services, request, timeout)
        cpu_used = cpu_seconds(processes) - cpu_before
        load = os.getloadavg()[0]
    finally:
        for process in processes:
            process.stop()
    if outcome["state"] != "succeeded":
        raise RuntimeError(f"proof with {workers} worker(s) {outcome['state']}: {outcome['error']}")
    nonces = request["nonce_end"] - request["nonce_start"]
    by_node, proving_seconds = segments_of(services, outcome["id"])
    wall = outcome["wall_seconds"]
    return {"workers": workers, "wall": wall, "rate": nonces / wall, "by_node": dict(sorted(by_node.items())),
            "busy": proving_seconds / (wall * workers), "load": load, "core": cpu_used / (wall * workers),
            "per_cpu_second": nonces / cpu_used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nonces", type=int, default=98_304)
    parser.add_argument("--segment-size", type=int, default=4096)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration, alternating")
    args = parser.parse_args()
    request = {"kind": "poc", "seed": SEED, "nonce_start": 0, "nonce_end": args.nonces, "segment_size": args.segment_size,
               "allow_cpu": True, "options": {"preset": args.preset}}
    segments = -(-args.nonces // args.segment_size)
    print(f"proof: preset {args.preset}, {args.nonces:,} nonces in {segments} segments of {args.segment_size:,}; "
          f"each worker: 1 job at a time, 1 torch thread")
    with bench_cluster() as (settings, folder):
        services = Services(settings)
        bare, runs = [], []
        for _ in range(args.repeat):
            for workers in range(1, args.max_workers + 1):
                bare.append(measure_bare(workers, request))
                runs.append(measure(settings, folder, services, workers, request, args.timeout))
    report("bare processes (no Nexus)", bare, with_segments=False)
    report("nexus workers", runs, with_segments=True)
    bare_best, nexus_best = best_rates(bare), best_rates(runs)
    for workers in range(2, args.max_workers + 1):
        bare_up, nexus_up = bare_best[workers] / bare_best[1], nexus_best[workers] / nexus_best[1]
        print(f"best runs, {workers} vs 1: bare {bare_up:.2f}x, nexus {nexus_up:.2f}x "
              f"({nexus_up / bare_up:.0%} of what the machine gave)")


def best_rates(runs: list[dict]) -> dict[int, float]:
    return {n: max(r["rate"] for r in runs if r["workers"] == n) for n in sorted({r["workers"] for r in runs})}


def report(title: str, runs: list[dict], with_segments: bool) -> None:
    """busy: the share of the workers' wall time spent inside segment handlers (the rest is dispatch,
    storage and waiting). core: the CPU each worker process got, as a share of one core over the run;
    load: the 1-minute load average at its end. Other work on these cores shows up there, and directly
    in the speed-up. n/cpu-s: nonces per CPU-second of the workers; equal figures for 1 and 2 workers
    mean no work is lost to coordination, so the speed-up is N on N free cores."""
    base = best_rates(runs)[1]
    print(f"\n{title}")
    print(f"{'workers':>7} {'wall s':>8} {'nonces/s':>10} {'speed-up':>9} {'busy':>6} {'core':>6} {'load':>5}"
          f" {'n/cpu-s':>8}  {'segments per node' if with_segments else ''}")
    for run in runs:
        busy = f"{run['busy']:>6.0%}" if "busy" in run else f"{'-':>6}"
        print(f"{run['workers']:>7} {run['wall']:>8.2f} {run['rate']:>10,.0f} {run['rate'] / base:>8.2f}x "
              f"{busy} {run['core']:>6.0%} {run['load']:>5.1f} {run['per_cpu_second']:>8,.0f}"
              f"  {run['by_node'] if with_segments else ''}")

if __name__ == "__main__":
    main()
