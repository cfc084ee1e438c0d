"""The worker's Celery app and its command line: the one place for Celery's worker flags.

`celery -A nexus.worker.app worker` (Flower, ad-hoc use) finds `app` here, built on first access
from the environment's Settings, so importing this module for its functions builds nothing.
"""

from __future__ import annotations

from typing import Sequence

from celery import Celery

from nexus.config import Settings, load_settings
from nexus.queueing.celery_app import make_celery
from nexus.worker.task import register_tasks


def make_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    register_tasks(app, settings)
    return app


def celery_worker_argv(queues: Sequence[str], pool: str, concurrency: int, hostname: str,
                       send_events: bool) -> list[str]:
    """Arguments of Celery's `worker` command for one Nexus worker."""
    if not queues:
        raise ValueError("a worker must consume at least one queue")
    argv = ["worker", "--queues", ",".join(queues), "--pool", pool, "--concurrency", str(concurrency),
            "--hostname", hostname, "--prefetch-multiplier", "1", "--loglevel", "INFO",
            # Gossip and mingle chat with every other worker at start and on every event: with
            # hundreds of nodes on one Redis that is pure load, and Nexus needs neither.
            "--without-gossip", "--without-mingle"]
    if send_events:  # Flower's task view needs them
        argv.append("--task-events")
    return argv


def __getattr__(name: str) -> Celery:
    if name == "app":
        app = make_worker_app(load_settings())
        globals()["app"] = app
        return app
    raise AttributeError(name)
