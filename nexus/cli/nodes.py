"""Node commands: `nexus agent` runs a node; `status`, `nodes` and `node drain|resume|remove` manage them."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
from rich.table import Table

from nexus.cli.jobs import _fail, client, console, emit_json, json_option
from nexus.client import NexusError
from nexus.config import load_server_settings
from nexus.nodes.states import NodeState
from nexus.queueing.tiers import TIER_ORDER


@click.command("agent")
@click.option("--name", default=None, help="Node name (default: NEXUS_NODE_NAME, else the host name).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the node token is kept (default: NEXUS_DATA_DIR).")
@click.option("--hardware-fixture", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Pretend to have the hardware in this JSON file (NEXUS_AGENT_HARDWARE_FIXTURE).")
def agent_cmd(name: str | None, data_dir: Path | None, hardware_fixture: str | None) -> None:
    """Run this machine as a node: detect GPUs, register, heartbeat and supervise one worker per GPU."""
    from nexus.agent.run import Agent

    overrides = {"node_name": name, "data_dir": data_dir, "agent_hardware_fixture": hardware_fixture}
    if hardware_fixture:
        overrides["agent_detector"] = "fixture"
    agent = Agent(load_server_settings(**{k: v for k, v in overrides.items() if v is not None}))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, agent.request_stop)
    sys.exit(agent.run())


def _node_rows(nodes: list[dict]) -> Table:
    table = Table("id", "name", "tier", "state", "GPUs", "VRAM free/total (MB)", "jobs", "heartbeat", "failures",
                  "measured tok/s")
    for node in nodes:
        free = sum(g.get("memory_free_mb") or 0 for g in (node.get("resources") or {}).get("gpus", []))
        vram = f"{free}/{node['vram_total_mb']}" if node["gpu_count"] else "-"
        age = node.get("heartbeat_age_seconds")
        state = node["state"] + (" (drain)" if node["drain_requested"] and node["state"] != "draining" else "")
        table.add_row(node["id"][:8], node["name"], node["tier"], state, str(node["gpu_count"]), vram,
                      str(len(node["running_jobs"])), "-" if age is None else f"{age:.0f}s ago",
                      str(node["consecutive_failures"]), _measured(node.get("measured") or []))
    return table


def _measured(entries: list[dict]) -> str:
    """The node's benchmarks: each model's latest measured output tok/s (placement prefers more)."""
    return ", ".join(f"{e['model']} {e['output_tok_s']:.0f}" for e in entries) or "-"


@click.command("nodes")
@click.option("--tier", type=click.Choice([t.value for t in TIER_ORDER]), default=None)
@click.option("--state", type=click.Choice([s.value for s in NodeState]), default=None)
@click.option("--has-gpu/--no-gpu", default=None)
@click.option("--model", default=None, help="Nodes that have this model loaded.")
@json_option
def nodes_cmd(tier, state, has_gpu, model, as_json):
    """List the nodes (admin)."""
    params = {k: v for k, v in {"tier": tier, "state": state, "has_gpu": has_gpu, "model": model}.items()
              if v is not None}
    try:
        nodes = client().request("GET", "/api/v1/nodes", params=params)["nodes"]
    except NexusError as exc:
        _fail(exc)
    emit_json({"nodes": nodes}) if as_json else console.print(_node_rows(nodes))


@click.command("status")
@json_option
def status_cmd(as_json):
    """The cluster as a table: nodes by tier, GPUs, VRAM, state, jobs, last heartbeat; queues."""
    try:
        nexus = client()
        nodes = nexus.request("GET", "/api/v1/nodes")["nodes"]
        cluster = nexus.request("GET", "/api/v1/cluster")
    except NexusError as exc:
        _fail(exc)
    if as_json:
        emit_json({"cluster": cluster, "nodes": nodes})
        return
    tiers = Table("tier", "nodes", "by state", "GPUs", "VRAM free/total (MB)", "reserved (MB)")
    for tier in (t.value for t in TIER_ORDER):
        totals = cluster["tiers"][tier]
        states = ", ".join(f"{n} {s}" for s, n in sorted(totals["nodes_by_state"].items())) or "-"
        tiers.add_row(tier, str(totals["nodes"]), states, str(totals["gpus"]),
                      f"{totals['vram_free_mb']}/{totals['vram_total_mb']}", str(totals["vram_reserved_mb"]))
    console.print(tiers)
    console.print(_node_rows(nodes))
    jobs = cluster["jobs"]
    queues = ", ".join(f"{q} {n}" for q, n in cluster["queues"].items())
    console.print(f"jobs: {jobs['running']} running, {jobs['queued']} queued, {jobs['retrying']} retrying   "
                  f"queues: {queues}")


@click.group("node")
def node_cmd():
    """Drain, resume or remove one node (admin), named by id, id prefix or name."""


def resolve_node(nexus, reference: str) -> str:
    """A node id from its id, the first characters of its id (as `nexus status` shows them) or its name."""
    nodes = nexus.request("GET", "/api/v1/nodes")["nodes"]
    matches = [n["id"] for n in nodes if reference in (n["id"], n["name"]) or n["id"].startswith(reference)]
    if len(matches) != 1:
        raise click.ClickException(f"{reference!r} matches {len(matches)} live nodes; give the full id")
    return matches[0]


def _node_action(method: str, suffix: str, reference: str, verb: str) -> None:
    nexus = client()
    try:
        node = nexus.request(method, f"/api/v1/nodes/{resolve_node(nexus, reference)}{suffix}")
    except NexusError as exc:
        _fail(exc)
    console.print(f"node {node['name']} ({node['id']}) {verb}: now {node['state']}")


@node_cmd.command("drain")
@click.argument("node")
def drain_cmd(node):
    """Stop giving the node work; running jobs finish."""
    _node_action("POST", "/drain", node, "drained")


@node_cmd.command("resume")
@click.argument("node")
def resume_cmd(node):
    """Undo a drain or clear a quarantine."""
    _node_action("POST", "/resume", node, "resumed")


@node_cmd.command("remove")
@click.argument("node")
def remove_cmd(node):
    """Remove the node for good: its token stops working, its running jobs are re-queued."""
    _node_action("DELETE", "", node, "removed")
