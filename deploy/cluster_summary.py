"""A one-screen summary of a running cluster: API health, jobs by state, queue depths, nodes.

Used by `just status` (once) and `just monitor` (every few seconds). It asks the
API, so it works the same for a Docker deployment and a `nexus dev` cluster:
the URL and token come from NEXUS_URL / NEXUS_TOKEN (the justfile sets them
from bento.env on the master) or from the local cluster's .nexus/cluster.json.

    python deploy/cluster_summary.py [--watch SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import requests  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from nexus.client import NexusClient, NexusError  # noqa: E402
from nexus.config import load_settings  # noqa: E402


def metric_totals(metrics_text: str, name: str, label: str) -> dict[str, float]:
    """Sum the samples of gauge `name` by one label (e.g. nexus_jobs by state)."""
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(metrics_text):
        if family.name == name:
            for sample in family.samples:
                totals[sample.labels.get(label, "")] += sample.value
    return dict(totals)


def nodes_line(client: NexusClient, metrics_text: str) -> str:
    """Nodes from the nodes API when this master has it, else from the nexus_nodes metric."""
    try:
        listing = client.request("GET", "/api/v1/nodes")
    except (NexusError, requests.RequestException, ValueError):
        listing = None
    if isinstance(listing, dict):
        listing = listing.get("items") or listing.get("nodes")
    if isinstance(listing, list):
        by_state: dict[str, int] = defaultdict(int)
        for node in listing:
            by_state[f"{node.get('tier', '?')}/{node.get('state', '?')}"] += 1
        return _pairs(by_state) or "none registered"
    return _pairs(metric_totals(metrics_text, "nexus_nodes", "state")) or "none reported"


def _pairs(counts: dict) -> str:
    return "  ".join(f"{key}={int(value)}" for key, value in sorted(counts.items()) if value)


def summary(client: NexusClient) -> str:
    try:
        health = client.health()
    except (requests.RequestException, ValueError) as exc:
        return f"API {client.url}: unreachable ({type(exc).__name__}: {exc})"
    lines = [f"API {client.url}: {health.get('status')}  " + "  ".join(
        f"{name}={'ok' if dep.get('ok') else 'DOWN'}" for name, dep in health.get("dependencies", {}).items())]
    response = client.session.get(client.url + "/metrics", timeout=client.timeout)
    if response.status_code != 200:
        lines.append(f"jobs, queues, nodes: HTTP {response.status_code} from /metrics (they need the admin "
                     "token: run `just status` on the master, or set NEXUS_TOKEN)")
        return "\n".join(lines)
    text = response.text
    lines.append("jobs:   " + (_pairs(metric_totals(text, "nexus_jobs", "state")) or "none"))
    lines.append("queues: " + (_pairs(metric_totals(text, "nexus_queue_depth", "queue")) or "all empty"))
    lines.append("nodes:  " + nodes_line(client, text))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=float, default=0, help="Refresh every SECONDS until Ctrl-C.")
    args = parser.parse_args()
    settings = load_settings()
    try:
        client = NexusClient.from_settings(settings)
    except NexusError as exc:
        if not settings.url:
            print(f"cannot reach the cluster: {exc.message}", file=sys.stderr)
            return 1
        client = NexusClient(settings.url, "")  # a worker host: health needs no token, metrics do
    client.timeout = 5
    while True:
        report = summary(client)
        if not args.watch:
            print(report)
            return 0 if "unreachable" not in report else 1
        print(f"\033[2J\033[H{time.strftime('%H:%M:%S')}  (Ctrl-C to stop)\n{report}", flush=True)
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
