"""Commands that run a part of the cluster: dev (all of it), master, worker, reconciler, flower."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from nexus.config import load_settings


@click.command("dev")
@click.option("-n", "--workers", default=2, show_default=True, type=click.IntRange(0, 64), help="CPU workers to start.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".nexus"),
              show_default=True, help="Where servers keep data and cluster.json is written.")
@click.option("--api-port", type=int, default=None, help="API port (default: NEXUS_API_PORT, 8000).")
def dev_cmd(workers: int, data_dir: Path, api_port: int | None) -> None:
    """Start a whole local cluster with no Docker: Redis, PostgreSQL, S3, API, reconciler, Flower, workers."""
    from nexus.dev import LocalCluster

    overrides = {"api_port": api_port} if api_port else {}
    LocalCluster(load_settings(**overrides), data_dir, workers).run()


@click.command("master")
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", default=16, show_default=True, help="Threads per gunicorn worker.")
def master_cmd(workers: int, threads: int) -> None:
    """Apply migrations, create buckets and the admin token, then serve the API with gunicorn."""
    from nexus.master import exec_api_server, prepare_master

    settings = load_settings()
    prepare_master(settings)
    exec_api_server(settings, workers, threads)


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
    from nexus.queueing.celery_app import make_celery
    from nexus.queueing.tasks import node_name, register_tasks
    from nexus.queueing.tiers import Tier, queues_for_worker

    overrides = {k: v for k, v in {"worker_tier": tier, "worker_concurrency": concurrency,
                                    "worker_pool": pool}.items() if v is not None}
    settings = load_settings(**overrides)
    queue_list = queues.split(",") if queues else queues_for_worker(Tier.parse(settings.worker_tier),
                                                                    settings.worker_take_lower_tiers)
    app = make_celery(settings)
    register_tasks(app, settings)
    hostname = name or f"{node_name(settings)}-{os.getpid()}@{socket.gethostname()}"
    worker_concurrency = settings.worker_concurrency
    serving = _start_model_serving(settings, app, hostname, models)  # inference (issue 4)
    if serving is not None:
        queue_list = list(dict.fromkeys([*queue_list, *serving.queues]))
        worker_concurrency = max(worker_concurrency, settings.inference_concurrency)
    argv = ["worker", "-Q", ",".join(queue_list), "-P", settings.worker_pool, "-c", str(worker_concurrency),
            "-n", hostname, "--without-gossip", "--without-mingle", "--loglevel=INFO"]
    if settings.worker_send_events:  # Flower's task view needs them
        argv.append("-E")
    try:
        app.worker_main(argv)
    finally:
        if serving is not None:
            # Free the backends (a vLLM server is a process of its own) and withdraw the instances
            # now, so the API answers 503 at once instead of queueing for a worker that is gone.
            serving.close()


def _start_model_serving(settings, app, hostname: str, models: tuple[str, ...]):
    """Load the models this worker serves before the pool starts (in the process that uses them)."""
    from nexus.inference.serving import ServingStartError, model_names, start_serving

    names = model_names(settings, models)
    if not names:
        return None
    if settings.worker_pool == "prefork":
        raise click.UsageError("a worker serving models runs the threads (or solo) pool: the model lives in-process")
    try:
        return start_serving(settings, app, hostname, names)
    except ServingStartError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("reconciler")
def reconciler_cmd() -> None:
    """Re-publish lost messages and expire dead workers' leases, every few seconds, until stopped."""
    from nexus.jobs.reconciler import Reconciler
    from nexus.services import Services

    services = Services(load_settings())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Reconciler(services.settings, services.engine, services.celery, services.redis).run_forever(stop)


@click.command("flower")
def flower_cmd() -> None:
    """Flower, behind basic auth, on NEXUS_FLOWER_HOST:NEXUS_FLOWER_PORT."""
    settings = load_settings()
    celery = shutil.which("celery") or os.path.join(os.path.dirname(sys.executable), "celery")
    # Credentials through Flower's own environment variable, not argv (which `ps` shows to everyone).
    env = {**os.environ, "FLOWER_BASIC_AUTH": f"{settings.flower_user}:{settings.flower_password}"}
    os.execve(celery, [celery, "-b", settings.redis_url, "flower", f"--address={settings.flower_host}",
                       f"--port={settings.flower_port}", "--purge_offline_workers=60"], env)
