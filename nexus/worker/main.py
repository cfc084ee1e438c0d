"""`nexus worker`: pick the queues, load the models it serves, then run Celery's worker loop.

The one way a worker process starts, whether by hand, as an agent's tier worker or as a
model instance's worker (nexus.worker.processes builds the agent's command lines).
"""

from __future__ import annotations

import os
import socket
from typing import Sequence

from nexus.config import Settings
from nexus.queueing.tiers import Tier, queues_for_worker
from nexus.worker.app import celery_worker_argv, make_worker_app
from nexus.worker.task import node_name


class WorkerConfigError(ValueError):
    """The worker cannot start as asked (a message for the operator)."""


def run_worker(settings: Settings, queues: Sequence[str] | None = None, name: str | None = None,
               models: Sequence[str] = ()) -> None:
    """Consume `queues` (default: the tier's) until Celery's worker stops; serve `models` meanwhile."""
    from nexus.serving.host import ServingStartError, model_names, start_serving

    queue_list = list(queues or queues_for_worker(Tier.parse(settings.worker_tier), settings.worker_take_lower_tiers))
    app = make_worker_app(settings)
    hostname = name or f"{node_name(settings)}-{os.getpid()}@{socket.gethostname()}"
    concurrency = settings.worker_concurrency
    serving = None
    served = model_names(settings, tuple(models))
    if served:
        # Loaded before the pool starts, in the process that uses them.
        if settings.worker_pool == "prefork":
            raise WorkerConfigError("a worker serving models runs the threads (or solo) pool: "
                                    "the model lives in-process")
        try:
            serving = start_serving(settings, app, hostname, served)
        except ServingStartError as exc:
            raise WorkerConfigError(str(exc)) from None
        queue_list = list(dict.fromkeys([*queue_list, *serving.queues]))
        concurrency = max(concurrency, settings.inference_concurrency)
    try:
        app.worker_main(celery_worker_argv(queue_list, settings.worker_pool, concurrency, hostname,
                                           settings.worker_send_events))
    finally:
        if serving is not None:
            # Free the backends (a vLLM server is a process of its own) and withdraw the instances
            # now, so the API answers 503 at once instead of queueing for a worker that is gone.
            serving.close()
