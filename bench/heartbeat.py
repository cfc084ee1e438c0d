"""Heartbeat load: 1,000 simulated nodes beating every 5 s against a real API process on 127.0.0.1.

    python bench/heartbeat.py [--nodes 1000] [--interval 5] [--seconds 40] [--api-workers 2] [--node-api-in-process]

Registers the nodes through the API (join token), then each node sends the
agent's real heartbeat body (hardware fixtures in turn: 8xH100, 4090, 3060, CPU-only …)
on its own 5 s rhythm, phases spread over the interval, over keep-alive connections.
Reports heartbeat latency (p50/p99/max), the rate achieved, how late beats left
(client saturation shows there), the CPU the API processes and PostgreSQL used,
and how long one reconciler liveness pass over the fleet takes. Target: p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from bench.common import bench_cluster, describe_ms, percentile  # noqa: E402
from nexus.agent.heartbeat import heartbeat_body, registration_body  # noqa: E402
from nexus.nodes.liveness import reconcile_nodes  # noqa: E402
from nexus.services import Services  # noqa: E402
from tests.agent_support import FIXTURE_NAMES, hardware  # noqa: E402
from tests.support import NexusProcess  # noqa: E402

SENDERS = 48  # client threads, each with its own keep-alive connection


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.conn = host, port, None

    def post(self, path: str, body: bytes, token: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                self.conn.request("POST", path, body, {"Content-Type": "application/json",
                                                       "Authorization": f"Bearer {token}"})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def start_api(settings, folder: Path, workers: int, in_process: bool = False) -> NexusProcess:
    import requests

    flags = ["--node-api-in-process"] if in_process else []  # the node API on waitress in the master's process
    api = NexusProcess(settings, ["master", "--workers", str(workers), *flags], folder, "api",
                       {"NEXUS_JOIN_TOKEN": "nxj_bench-join-token"}).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(settings.public_api_url + "/healthz", timeout=1).status_code == 200:
                return api
        except requests.RequestException:
            time.sleep(0.2)
    raise TimeoutError(api.log_text()[-2000:])


def node_port(settings) -> int:
    """Where agents register and beat: the node API (the user API when there is none)."""
    return settings.node_api_port or settings.api_port


def register_all(settings, n: int) -> list[dict]:
    local = threading.local()

    def register(i: int) -> dict:
        if not hasattr(local, "conn"):
            local.conn = Connection(settings.api_host, node_port(settings))
        hw = hardware(FIXTURE_NAMES[i % len(FIXTURE_NAMES)])
        body = registration_body(hw, f"bench-node-{i:04d}", ["cpu_only"])
        status, raw = local.conn.post("/api/v1/nodes/register", json.dumps(body).encode(), "nxj_bench-join-token")
        assert status == 201, raw
        answer = json.loads(raw)
        beat = heartbeat_body(hw, state="ready", running_jobs=[], loaded_models=[], workers=[{"name": "cpu"}],
                              cpu_percent=10.0, sent_at=0.0)
        return {"path": f"/api/v1/nodes/{answer['node_id']}/heartbeat", "token": answer["node_token"],
                "body": json.dumps(beat).encode()}

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(register, range(n)))


def beat_for(nodes: list[dict], settings, interval: float, seconds: float):
    """Every node beats every `interval` from a random phase; returns (latencies, lateness, errors)."""
    due = [(random.uniform(0, interval), i) for i in range(len(nodes))]
    heapq.heapify(due)
    work: queue.Queue = queue.Queue()
    latencies, lateness, errors = [], [], []
    start = time.monotonic()
    end = start + seconds

    def sender():
        conn = Connection(settings.api_host, node_port(settings))
        while (item := work.get()) is not None:
            node, scheduled = item
            sent = time.monotonic()
            status, raw = conn.post(node["path"], node["body"], node["token"])
            latencies.append(time.monotonic() - sent)
            lateness.append(sent - scheduled)
            if status != 200:
                errors.append((status, raw[:200]))

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    while due and (at := start + due[0][0]) < end:
        time.sleep(max(0.0, at - time.monotonic()))
        offset, i = heapq.heappop(due)
        work.put((nodes[i], start + offset))
        heapq.heappush(due, (offset + interval, i))
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join()
    return latencies, lateness, errors, time.monotonic() - start


def cpu_by_pid(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings by the processes alive at the second (new ones from zero)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def api_processes(api: NexusProcess) -> list[psutil.Process]:
    root = psutil.Process(api.process.pid)
    return [root, *root.children(recursive=True)]


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the fleet heartbeats (bounded)")
    parser.add_argument("--api-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--node-api-in-process", action="store_true",
                        help="the node API on threads of the master's process (what nexus dev runs)")
    args = parser.parse_args()

    with bench_cluster(join_token="nxj_bench-join-token") as (settings, folder):
        api = start_api(settings, folder, args.api_workers, args.node_api_in_process)
        try:
            registered_at = time.monotonic()
            nodes = register_all(settings, args.nodes)
            print(f"registered {len(nodes)} nodes in {time.monotonic() - registered_at:.1f} s")
            readings = lambda: (cpu_by_pid(api_processes(api)), cpu_by_pid(postgres_processes()),
                                cpu_by_pid([psutil.Process()]))
            before, busy_before = readings(), machine_busy_seconds()
            latencies, lateness, errors, elapsed = beat_for(nodes, settings, args.interval, args.seconds)
            after, busy_after = readings(), machine_busy_seconds()
            started = time.perf_counter()
            reconcile_nodes(Services(settings).engine, settings)
            liveness_ms = (time.perf_counter() - started) * 1000
        finally:
            api.stop()
    api_cpu, pg_cpu, client_cpu = (cpu_used(b, a) / elapsed for b, a in zip(before, after, strict=True))
    machine_cpu = (busy_after - busy_before) / elapsed
    p99 = percentile([v * 1000 for v in latencies], 99)
    print(f"heartbeats   {len(latencies)} in {elapsed:.1f} s = {len(latencies) / elapsed:.0f}/s "
          f"({args.nodes} nodes every {args.interval:g} s), errors {len(errors)}")
    print(f"latency      {describe_ms(latencies)}  max {max(latencies) * 1000:.1f} ms")
    print(f"sent late    {describe_ms(lateness)}  (how long a due beat waited for a free sender)")
    print(f"master CPU   API {api_cpu:.2f} cores ({args.api_workers} gunicorn workers), "
          f"PostgreSQL {pg_cpu:.2f} cores (the whole server), bench client {client_cpu:.2f} cores, "
          f"on {psutil.cpu_count()} cores")
    print(f"machine      {machine_cpu:.2f} of {psutil.cpu_count()} cores busy in all (other work on the host included)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"liveness     one reconciler node pass over {args.nodes} nodes: {liveness_ms:.1f} ms")
    print(f"target       p99 < 50 ms: {'met' if p99 < 50 and not errors else 'NOT met'} (p99 {p99:.1f} ms)")
    if errors:
        print("first errors:", errors[:3])


if __name__ == "__main__":
    main()
