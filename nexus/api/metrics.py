"""Prometheus metrics read from the sources of truth at scrape time.

`nexus_jobs` counts unfinished jobs (queued, running, retrying) from the rows, through the
(state, type) index: a scrape reads the active jobs only, however many finished ones
are kept. Finished states come from `job_counters`, which the transition that finishes
a job increments in the same transaction (a trigger, migration 0006): exact, never
drifting, and still counting jobs retention has deleted. For a final state the value is
therefore how many jobs ever finished so (a manually retried job counts again when it
finishes again). PostgreSQL rather than Redis counters: Redis is transport here (it may
be flushed or restarted), and a trigger misses no code path that finishes a job.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import text

from nexus.jobs.notify import DURATION_BUCKETS, DURATION_KEY
from nexus.jobs.reconciler import queue_depth
from nexus.jobs.states import CLAIMABLE_STATES, JobState, sql_in
from nexus.models import catalog
from nexus.queueing.tiers import TIER_ORDER


ACTIVE_COUNTS = text("SELECT state, type, count(*) FROM jobs WHERE state IN ('queued', 'running', 'retrying') "
                     "GROUP BY state, type")
FINISHED_COUNTS = text("SELECT state, type, sum(n) FROM job_counters GROUP BY state, type")
# One statement, so one snapshot: read as two, a job finishing between them was counted
# both running and succeeded (seen in CI).
JOB_COUNTS = text(f"{ACTIVE_COUNTS.text} UNION ALL {FINISHED_COUNTS.text}")


class NexusCollector:
    def __init__(self, services):
        self.services = services

    def collect(self):
        with self.services.engine.connect() as conn:
            rows = conn.execute(JOB_COUNTS).all()
            queues = {r[0] for r in conn.execute(text(
                f"SELECT DISTINCT queue FROM jobs WHERE {sql_in('state', CLAIMABLE_STATES)}"))}
            models = [spec.name for spec in catalog.list_models(conn)]
        jobs = GaugeMetricFamily("nexus_jobs", "Jobs by state and type", labels=["state", "type"])
        seen_types = {t for _, t, _ in rows} or {"noop"}
        counts = {(s, t): n for s, t, n in rows}
        for state in JobState:
            for job_type in sorted(seen_types):
                jobs.add_metric([state.value, job_type], counts.get((state.value, job_type), 0))
        yield jobs

        depth = GaugeMetricFamily("nexus_queue_depth", "Messages waiting in each broker queue", labels=["queue"])
        for queue in sorted(queues | {t.queue for t in TIER_ORDER}):
            depth.add_metric([queue], queue_depth(self.services.redis, queue))
        yield depth

        yield from self._durations(sorted(seen_types))
        yield self._model_requests(models)

    def _model_requests(self, models: list[str]):
        """Each model's /v1 requests by slot state (as vLLM's num_requests_running / _waiting), and its slots."""
        family = GaugeMetricFamily("nexus_model_requests", "A model's /v1 requests holding a serving slot "
                                   "(in_flight), waiting for one (waiting), and its live slots (capacity)",
                                   labels=["model", "state"])
        for name in models:
            load = self.services.admission.load(name)
            for state in ("capacity", "in_flight", "waiting"):
                family.add_metric([name, state], getattr(load, state))
        return family

    def _durations(self, job_types):
        family = HistogramMetricFamily("nexus_job_duration_seconds", "Run time of succeeded jobs", labels=["type"])
        for job_type in job_types:
            raw = {k.decode(): float(v) for k, v in self.services.redis.hgetall(DURATION_KEY.format(type=job_type)).items()}
            if not raw:
                continue
            cumulative, buckets = 0.0, []
            for bound in DURATION_BUCKETS:
                cumulative += raw.get(str(bound), 0.0)
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", cumulative + raw.get("+Inf", 0.0)))
            family.add_metric([job_type], buckets, raw.get("sum", 0.0))
        yield family
