"""Prometheus metrics of the fleet, read from the nodes table at scrape time (heartbeats keep it current)."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import text

from nexus.nodes.states import NodeState
from nexus.queueing.tiers import TIER_ORDER

_GPUS = text(
    """SELECT n.name, n.tier, (g ->> 'index') AS gpu, (g ->> 'utilization_percent')::float AS utilization,
              (g ->> 'memory_total_mb')::float AS total_mb, (g ->> 'memory_free_mb')::float AS free_mb
       FROM nodes n, jsonb_array_elements(coalesce(n.resources -> 'gpus', '[]'::jsonb)) g
       WHERE n.state NOT IN ('removed', 'offline')"""
)


class NodeCollector:
    def __init__(self, services):
        self.services = services

    def collect(self):
        with self.services.engine.connect() as conn:
            counts = conn.execute(text("SELECT tier, state, count(*) FROM nodes GROUP BY tier, state")).all()
            ages = conn.execute(text("SELECT name, tier, EXTRACT(EPOCH FROM now() - last_heartbeat_at) FROM nodes "
                                     "WHERE state <> 'removed'")).all()
            gpus = conn.execute(_GPUS).all()
        yield _node_counts(counts)
        age = GaugeMetricFamily("nexus_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat",
                                labels=["node", "tier"])
        for name, tier, seconds in ages:
            age.add_metric([name, tier], float(seconds))
        yield age
        yield from _gpu_families(gpus)


def _node_counts(rows) -> GaugeMetricFamily:
    family = GaugeMetricFamily("nexus_nodes", "Nodes by tier and state", labels=["tier", "state"])
    counts = {(tier, state): n for tier, state, n in rows}
    for tier in TIER_ORDER:
        for state in NodeState:
            family.add_metric([tier.value, state.value], counts.get((tier.value, state.value), 0))
    return family


def _gpu_families(rows):
    labels = ["node", "tier", "gpu"]
    utilization = GaugeMetricFamily("nexus_gpu_utilization_percent", "GPU utilisation from heartbeats", labels=labels)
    total = GaugeMetricFamily("nexus_gpu_memory_total_bytes", "GPU memory from heartbeats", labels=labels)
    free = GaugeMetricFamily("nexus_gpu_memory_free_bytes", "Free GPU memory from heartbeats", labels=labels)
    for row in rows:
        key = [row.name, row.tier, str(row.gpu)]
        if row.utilization is not None:
            utilization.add_metric(key, row.utilization)
        total.add_metric(key, row.total_mb * 2**20)
        free.add_metric(key, row.free_mb * 2**20)
    return utilization, total, free
