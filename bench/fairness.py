"""Fairness: a well-behaved tenant's round trips and the node heartbeats while another tenant floods.

    python bench/fairness.py [--seconds 30] [--polls 64] [--backlog 5000] [--fail-rate 40] [--own-postgres]

Starts the real `nexus master` (user API with 16 threads, node API beside it), a reconciler and
one CPU worker (4 threads) on 127.0.0.1, registers one node, and measures twice, for `--seconds`
each: without a flood, then with one. The flooding tenant (its own submitter token) holds
`--polls` long-polls (`GET /api/v1/jobs/<id>?wait=30` on a job nobody runs), keeps `--backlog`
jobs queued on a queue nobody consumes (gpu_peer), and submits `--fail-rate` `noop` jobs a second
that fail every attempt (they share the worker with the well-behaved tenant). The well-behaved
tenant sends `POST /api/v1/jobs?wait=10` of one `noop` job after another; the node heartbeats
the node API once a second, as an agent does. Prints p50/p99 of each, the ratio with/without the
flood (goal: p99 within 2x), and the heartbeat p99 under the flood (goal: < 50 ms).
Bounded: about 2 x seconds plus ~30 s of start-up and backlog.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.common import bench_cluster, describe_ms, percentile  # noqa: E402
from bench.heartbeat_flood import beats as beat_each_second  # noqa: E402
from nexus.agent.heartbeat import registration_body  # noqa: E402
from nexus.agent.master import MasterClient  # noqa: E402
from tests.agent_support import hardware  # noqa: E402
from tests.support import NexusProcess, start_api, start_worker  # noqa: E402

UNCONSUMED = {"tier": "gpu_peer"}  # no worker of this bench consumes it


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def submitter(url: str, admin: str, tenant: str) -> str:
    answer = requests.post(f"{url}/api/v1/tokens", json={"name": tenant, "role": "submitter", "tenant": tenant},
                           headers=auth(admin), timeout=30)
    answer.raise_for_status()
    return answer.json()["token"]


# --- the well-behaved tenant and the node -------------------------------------------------------------
def round_trips(url: str, token: str, seconds: float) -> dict:
    """Sequential POST ?wait= of one noop job: seconds each, and how many did not come back succeeded."""
    out: dict = {"ok": [], "bad": 0, "queued": [], "running": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            answer = requests.post(f"{url}/api/v1/jobs?wait=10", json={"type": "noop"}, headers=auth(token),
                                   timeout=30)
            if answer.status_code == 201 and (job := answer.json())["state"] == "succeeded":
                out["ok"].append(time.perf_counter() - started)
                # Where the time went, from the row: created -> claimed by a worker -> finished.
                created, began, ended = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at",
                                                                                    "finished_at"))
                out["queued"].append((began - created).total_seconds())
                out["running"].append((ended - began).total_seconds())
                continue
        except requests.RequestException:
            pass
        out["bad"] += 1
    return out


def heartbeats(client: MasterClient, identity, seconds: float) -> dict:
    out: dict = {"ok": [], "timeouts": 0}
    beat_each_second(client, identity, seconds, out)
    return out


def measure(url: str, token: str, client: MasterClient, identity, seconds: float) -> tuple[dict, dict]:
    beats: dict = {}
    beater = threading.Thread(target=lambda: beats.update(heartbeats(client, identity, seconds)))
    beater.start()
    trips = round_trips(url, token, seconds)
    beater.join()
    return trips, beats


# --- the flooding tenant ---------------------------------------------------------------------------------
def submit_backlog(url: str, token: str, count: int) -> list[str]:
    ids = []
    for start in range(0, count, 1000):
        jobs = [{"type": "noop", "requirements": UNCONSUMED} for _ in range(min(1000, count - start))]
        answer = requests.post(f"{url}/api/v1/jobs/bulk", json={"jobs": jobs}, headers=auth(token), timeout=120)
        answer.raise_for_status()
        ids += [job["id"] for job in answer.json()["jobs"]]
    return ids


def start_flood(url: str, token: str, waiting_job: str, polls: int, fail_rate: float,
                stop: threading.Event) -> dict:
    counts = {"polls": 0, "failing_submitted": 0}

    def poll():
        while not stop.is_set():
            try:
                requests.get(f"{url}/api/v1/jobs/{waiting_job}?wait=30", headers=auth(token), timeout=150)
                counts["polls"] += 1
            except requests.RequestException:
                pass

    def failing():
        batch = max(1, int(fail_rate / 4))  # four bulk posts a second
        body = {"jobs": [{"type": "noop", "payload": {"fail_attempts": 100}, "max_attempts": 3}] * batch}
        while not stop.is_set():
            began = time.monotonic()
            try:
                if requests.post(f"{url}/api/v1/jobs/bulk", json=body, headers=auth(token), timeout=30).ok:
                    counts["failing_submitted"] += batch
            except requests.RequestException:
                pass
            stop.wait(max(0.0, 0.25 - (time.monotonic() - began)))

    for _ in range(polls):
        threading.Thread(target=poll, daemon=True).start()
    threading.Thread(target=failing, daemon=True).start()
    return counts


def line(name: str, values: list[float], extra: str = "") -> str:
    return f"  {name:34s} n={len(values):5d}  {describe_ms(values) if values else 'none answered'}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--polls", type=int, default=64)
    parser.add_argument("--backlog", type=int, default=5000)
    parser.add_argument("--fail-rate", type=float, default=40, help="failing jobs submitted per second")
    parser.add_argument("--own-postgres", action="store_true", help="a PostgreSQL of its own, not the shared one")
    args = parser.parse_args()
    with bench_cluster(own_postgres=args.own_postgres) as (settings, folder):
        api, url = start_api(settings, folder)
        reconciler = NexusProcess(settings, ["reconciler"], folder, "reconciler").start()
        worker = start_worker(settings, folder, "bench-worker")
        stop = threading.Event()
        try:
            good = submitter(url, settings.admin_token, "well-behaved")
            bad = submitter(url, settings.admin_token, "flooder")
            client = MasterClient.for_settings(settings)
            identity = client.register(settings.join_token, registration_body(hardware("rtx4090"), "n1", ["gpu_peer"]))
            round_trips(url, good, 3)  # warm-up: connections, the worker's first jobs

            quiet_trips, quiet_beats = measure(url, good, client, identity, args.seconds)

            began = time.monotonic()
            backlog = submit_backlog(url, bad, args.backlog)
            backlog_s = time.monotonic() - began
            counts = start_flood(url, bad, backlog[0], args.polls, args.fail_rate, stop)
            time.sleep(2.0)  # the polls hold their threads, the first failures retry
            flood_trips, flood_beats = measure(url, good, client, identity, args.seconds)
            stop.set()

            print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
                  f"(1/5/15 min, {os.cpu_count()} CPUs)")
            print(f"flood: {args.polls} long-polls (wait=30), {args.backlog} queued on gpu_peer "
                  f"(submitted in {backlog_s:.1f} s), {counts['failing_submitted']} failing jobs submitted "
                  f"({args.fail_rate:g}/s target), {counts['polls']} polls answered")
            print(f"well-behaved tenant, POST /api/v1/jobs?wait=10 of a noop, {args.seconds:g} s each:")
            print(line("without flood", quiet_trips["ok"], f"  not succeeded {quiet_trips['bad']}"))
            print(line("with flood", flood_trips["ok"], f"  not succeeded {flood_trips['bad']}"))
            print("  of which, from the rows (created -> claimed by a worker, claimed -> finished):")
            for phase in ("queued", "running"):
                print(line(f"{phase}, without flood", quiet_trips[phase]))
                print(line(f"{phase}, with flood", flood_trips[phase]))
            print("node API heartbeats, one a second:")
            print(line("without flood", quiet_beats["ok"], f"  timed out {quiet_beats['timeouts']}"))
            print(line("with flood", flood_beats["ok"], f"  timed out {flood_beats['timeouts']}"))
            if quiet_trips["ok"] and flood_trips["ok"]:
                p50 = percentile(flood_trips["ok"], 50) / percentile(quiet_trips["ok"], 50)
                p99 = percentile(flood_trips["ok"], 99) / percentile(quiet_trips["ok"], 99)
                print(f"ratio with/without flood: p50 {p50:.2f}x  p99 {p99:.2f}x  (goal: p99 within 2x)")
            if flood_beats["ok"]:
                print(f"heartbeat p99 under the flood: {percentile(flood_beats['ok'], 99) * 1000:.1f} ms "
                      f"(goal: < 50 ms)")
        finally:
            stop.set()
            for process in (worker, reconciler, api):
                process.kill()


if __name__ == "__main__":
    main()
