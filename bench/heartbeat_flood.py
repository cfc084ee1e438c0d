"""Heartbeats under a long-poll flood: one submitter token holds every API thread with `?wait=` polls.

    python bench/heartbeat_flood.py [--polls 64] [--wait 30] [--seconds 20]

Starts the real `nexus master` (user API with 16 threads, and the node API
beside it), registers one node, and while `--polls` long-polls on a job nobody
runs are kept in flight, sends one heartbeat a second to each listener with the
agent's own client and 10 s timeout: to the user API (where agents beat before
the node API existed) and to the node API (where they beat now). Prints the
latency of each and how many beats timed out.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.common import bench_cluster, describe_ms  # noqa: E402
from nexus.agent.heartbeat import heartbeat_body, registration_body  # noqa: E402
from nexus.agent.master import MasterClient, MasterUnavailable  # noqa: E402
from tests.agent_support import hardware  # noqa: E402
from tests.support import start_api  # noqa: E402


def flood(url: str, token: str, job_id: str, polls: int, wait: float, stop: threading.Event) -> None:
    def poll():
        while not stop.is_set():
            try:
                requests.get(f"{url}/api/v1/jobs/{job_id}?wait={wait}", headers={"Authorization": f"Bearer {token}"},
                             timeout=wait + 120)
            except requests.RequestException:
                pass

    for _ in range(polls):
        threading.Thread(target=poll, daemon=True).start()


def beats(client: MasterClient, identity, seconds: float, out: dict) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = heartbeat_body(hardware("rtx4090"), state="ready", running_jobs=[], loaded_models=[], workers=[],
                              cpu_percent=1.0, sent_at=time.time())
        started = time.perf_counter()
        try:
            client.heartbeat(identity, body)
            out["ok"].append(time.perf_counter() - started)
        except MasterUnavailable:
            out["timeouts"] += 1
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=64)
    parser.add_argument("--wait", type=float, default=30)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    with bench_cluster() as (settings, folder):
        api, url = start_api(settings, folder)
        stop = threading.Event()
        try:
            admin = {"Authorization": f"Bearer {settings.admin_token}"}
            token = requests.post(f"{url}/api/v1/tokens", json={"name": "flood", "role": "submitter"},
                                  headers=admin, timeout=10).json()["token"]
            job = requests.post(f"{url}/api/v1/jobs", json={"type": "noop", "requirements": {"tier": "gpu_peer"}},
                                headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
            node_lane = MasterClient.for_settings(settings)
            identity = node_lane.register(settings.join_token, registration_body(hardware("rtx4090"), "b", ["gpu_peer"]))
            lanes = {"user API (before)": MasterClient(url, 10.0), "node API (after)": node_lane}
            flood(url, token, job["id"], args.polls, args.wait, stop)
            time.sleep(1.0)
            results = {name: {"ok": [], "timeouts": 0} for name in lanes}
            threads = [threading.Thread(target=beats, args=(client, identity, args.seconds, results[name]))
                       for name, client in lanes.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(f"{args.polls} long-polls (wait={args.wait:g} s) from one token, {args.seconds:g} s of beats:")
            for name, result in results.items():
                answered = describe_ms(result["ok"]) if result["ok"] else "none answered"
                print(f"  {name:18s} answered {len(result['ok']):3d}, timed out (10 s) {result['timeouts']:3d}: "
                      f"{answered}  max {max(result['ok'], default=0) * 1000:.0f} ms")
        finally:
            stop.set()
            api.kill()


if __name__ == "__main__":
    main()
