"""The Celery app factory: JSON only, late acks, one visibility timeout everywhere.

Celery is transport here, not the source of truth (docs/ARCHITECTURE.md, "Jobs are rows first"): a
message carries a job id and the attempt it is meant for, nothing else.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

from nexus.config import Settings
from nexus.queueing.tiers import TIER_ORDER

RUN_JOB_TASK = "nexus.run_job"
PRIORITY_LEVELS = 10  # API priorities 0 (lowest) .. 9 (most urgent)
# kombu's Redis transport keeps priority step n of queue q in the list `q{sep}n` (step 0 in `q`);
# nexus.queueing.broker reads those lists, so the separator is named once, here.
BROKER_KEY_SEP = ":"


def broker_priority(priority: int) -> int:
    """Redis' emulated priorities sort 0 first, so the most urgent API priority (9) maps to 0."""
    return PRIORITY_LEVELS - 1 - priority


# A publisher (the API submitting, the reconciler re-publishing) gives up on an unreachable broker
# within about this long instead of kombu's default ~6 s of retries: the API answers 503 promptly,
# and the reconciler's grace for a young queued job (nexus.jobs.reconciler) stays longer than any
# publish still in flight, so it never re-publishes a job whose submission is about to be undone.
PUBLISH_GIVE_UP_SECONDS = 2.0


def transport_options(settings: Settings) -> dict[str, Any]:
    return {
        # Must outlast the longest job, or Redis hands an unacknowledged message to a second
        # worker (celery#7918). Set for the broker and result backend alike.
        "visibility_timeout": settings.visibility_timeout_seconds,
        # Kombu's Redis channel allows 10 connections: the API on gevent publishes from as many
        # greenlets as it has open requests, and the 11th raised "Too many connections".
        "max_connections": settings.api_worker_connections,
        "priority_steps": list(range(PRIORITY_LEVELS)),
        "queue_order_strategy": "priority",
        "sep": BROKER_KEY_SEP,
        "socket_timeout": 10,
        "socket_connect_timeout": PUBLISH_GIVE_UP_SECONDS / 2,
        # kombu's reconnect loop before a publish (Connection.default_channel); consumers keep their own
        # unbounded retries (broker_connection_max_retries).
        "connect_retries_timeout": PUBLISH_GIVE_UP_SECONDS / 2,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
        "health_check_interval": 10,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("nexus", set_as_current=False)
    options = transport_options(settings)
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        broker_transport_options=options,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # JSON only: a pickled message is refused before anything runs.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Results live in PostgreSQL; Celery's result backend stays unused by Nexus tasks.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # On a lost broker connection, give unacknowledged work back instead of finishing it silently.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_queues=[Queue(t.queue) for t in TIER_ORDER],
        task_default_queue=TIER_ORDER[-1].queue,
        task_create_missing_queues=True,
        task_default_priority=broker_priority(5),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app
