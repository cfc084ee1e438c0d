"""/healthz (no auth: each dependency's reachability) and /metrics (Prometheus, token required)."""

from __future__ import annotations

import time

from apiflask import APIBlueprint
from flask import Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import text

from nexus.api.metrics import NexusCollector
from nexus.api.node_metrics import NodeCollector
from nexus.api.security import require, services
from nexus.queueing.health import CachedSummary

bp = APIBlueprint("health", __name__, tag="Operations")


def _probe(check) -> dict:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # any failure means "not reachable"; say which and why
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def dependency_checks() -> dict:
    s = services()

    def database():
        with s.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return {"database": database, "broker": s.redis.ping, "storage": s.store.ping}


@bp.get("/healthz")
@bp.doc(description="No token needed. 200 when every dependency answers, 503 otherwise. `workers` says "
                    "whether each live worker consumes its queues (informational: no worker is not an outage).")
def healthz():
    report = {name: _probe(check) for name, check in dependency_checks().items()}
    healthy = all(r["ok"] for r in report.values())
    return {"status": "ok" if healthy else "degraded", "dependencies": report, "workers": _worker_report()}, \
        200 if healthy else 503


def _worker_report() -> dict:
    try:
        # Whether each worker consumes (nexus.queueing.health), read from Redis once every few seconds.
        cache = current_app.extensions.setdefault("nexus_worker_health", CachedSummary(ttl=3.0))
        return cache.get(services().redis)
    except Exception as exc:  # the broker is down: the dependencies entry already says so
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


@bp.get("/metrics")
@bp.doc(security="bearer")
@require()
def metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NexusCollector(services()))
    registry.register(NodeCollector(services()))  # nodes, GPUs, heartbeat ages (nexus.api.node_metrics)
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
