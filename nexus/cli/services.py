"""Commands that run a part of the cluster: dev (all of it), master, worker, reconciler, flower."""

from __future__ import annotations

import os

import signal
import sys
import threading
from pathlib import Path

import click

from nexus.config import load_server_settings, load_settings


@click.command("dev")
@click.option("-n", "--workers", default=2, show_default=True, type=click.IntRange(0, 64), help="CPU workers to start.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".nexus"),
              show_default=True, help="Where servers keep data and cluster.json is written.")
@click.option("--api-port", type=int, default=None, help="API port (default: NEXUS_API_PORT, 8000).")
@click.option("--model", "model", default="tiny", show_default=True, metavar="PATH_OR_NAME",
              help="Model to serve on the first worker: a model folder, a catalog name, or the tiny model "
                   "(made on first start under the data dir).")
@click.option("--no-model", is_flag=True, help="Serve no model.")
def dev_cmd(workers: int, data_dir: Path, api_port: int | None, model: str, no_model: bool) -> None:
    """Start a whole local cluster with no Docker: Redis, PostgreSQL, S3, API, reconciler, Flower, workers
    and a model served on the first worker."""
    from nexus.dev import LocalCluster

    overrides = {"api_port": api_port} if api_port else {}
    LocalCluster(load_settings(**overrides), data_dir, workers, model=None if no_model else model).run()


@click.command("master")
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes.")
@click.option("--reconciler", "with_reconciler", is_flag=True,
              help="Run the reconciler in this process too (instead of `nexus reconciler`).")
@click.option("--flower", "with_flower", is_flag=True, help="Serve Flower from this process too (instead of `nexus flower`).")
@click.option("--node-api-in-process", is_flag=True,
              help="Serve the node API (register, heartbeat) from this process on threads, not a gunicorn of its own.")
def master_cmd(workers: int, with_reconciler: bool, with_flower: bool, node_api_in_process: bool) -> None:
    """Apply migrations, create buckets and the admin token, then serve the API (gevent) and the node API."""
    from nexus.master import prepare_in_child, serve_api

    settings = load_server_settings()  # refused settings end here, with the reason
    if prepare_in_child() != 0:
        raise click.ClickException("preparing the master failed (see the log above)")
    sys.exit(serve_api(settings, workers, reconciler=with_reconciler, flower=with_flower,
                       node_api_in_process=node_api_in_process))


@click.command("worker")
@click.option("--tier", envvar="NEXUS_WORKER_TIER", default=None, help="Tier queue to consume (default from Settings).")
@click.option("-Q", "--queues", default=None, help="Comma-separated queues, instead of the tier's.")
@click.option("-c", "--concurrency", type=int, default=None, help="Jobs run at once (default from Settings).")
@click.option("-P", "--pool", type=click.Choice(["threads", "solo", "prefork"]), default=None)
@click.option("--name", default=None, help="Worker name (default: node name and pid).")
@click.option("--model", "models", multiple=True, help="Serve this catalog model too (repeatable; NEXUS_WORKER_MODELS).")
def worker_cmd(tier: str | None, queues: str | None, concurrency: int | None, pool: str | None,
               name: str | None, models: tuple[str, ...]) -> None:
    """Run a Celery worker for this node's tier queues."""
    from nexus.worker.main import WorkerConfigError, run_worker

    overrides = {k: v for k, v in {"worker_tier": tier, "worker_concurrency": concurrency,
                                    "worker_pool": pool}.items() if v is not None}
    try:
        run_worker(load_server_settings(**overrides), queues.split(",") if queues else None, name, models)
    except WorkerConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("verifier")
@click.option("-c", "--concurrency", type=int, default=None, help="Jobs run at once (default from Settings).")
def verifier_cmd(concurrency: int | None) -> None:
    """Run the master's own worker: the jobs no node may record (a proof's verdict), with the master's credentials."""
    from nexus.config import Role
    from nexus.jobs.registry import master_job_types
    from nexus.queueing.routing import master_queue
    from nexus.worker.main import WorkerConfigError, run_worker

    settings = load_server_settings(**({"worker_concurrency": concurrency} if concurrency else {}))
    settings = settings.model_copy(update={"node_name": settings.node_name or "master"})  # jobs.node of a verdict
    if settings.role is not Role.MASTER:
        raise click.ClickException("the verifier runs on the master (NEXUS_ROLE=master): its verdicts are the "
                                   "master's, and a worker's database role may not record them")
    try:
        run_worker(settings, [master_queue(name) for name in master_job_types()], name=f"verifier-{os.getpid()}@%h")
    except WorkerConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("reconciler")
def reconciler_cmd() -> None:
    """Re-publish lost messages and expire dead workers' leases, every few seconds, until stopped."""
    from nexus.master import run_reconciler

    settings = load_server_settings()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_reconciler(settings, stop)


@click.command("flower")
def flower_cmd() -> None:
    """Flower, behind basic auth, on NEXUS_FLOWER_HOST:NEXUS_FLOWER_PORT, with the Nexus Celery app."""
    from nexus.queueing.monitor import run_flower

    run_flower(load_server_settings())
