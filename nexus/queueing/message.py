"""The one message Nexus puts on a queue: which job, which attempt, and where its rows can be read.

A message carries routing, never data (docs/ARCHITECTURE.md, "Queues carry routing"):
the job's row in PostgreSQL is the truth, and a message whose claim fails is dropped.

    JobMessage(job_id, attempt=1, queue="cpu_only", priority=5).publish(celery)
    message = JobMessage.from_task_args(args)     # the worker's side: run_job(*args)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from celery import Celery

from nexus.queueing.celery_app import RUN_JOB_TASK, broker_priority


@dataclass(frozen=True)
class JobMessage:
    job_id: str
    attempt: int
    queue: str
    priority: int = 5
    # The master's WAL position after the job was committed: a worker's standby that replayed this
    # far has the row. None (re-publications) means: read from the master.
    read_after_lsn: str | None = None

    def task_args(self) -> list[Any]:
        """The positional arguments of the `run_job` task, in the order it takes them."""
        return [self.job_id, self.attempt] + ([self.read_after_lsn] if self.read_after_lsn else [])

    @staticmethod
    def job_id_of(task_args: Sequence[Any]) -> str | None:
        """The job id in a `run_job` task's arguments (for hooks that see only the raw call)."""
        return str(task_args[0]) if task_args else None

    def publish(self, celery: Celery, producer: Any = None, countdown: float | None = None) -> None:
        """Publish with kombu directly. `countdown` delays the message (a worker holds it until then).

        Celery's own message builder (protocol 2), but not `send_task`: that adds ~0.2 ms of signals
        and repr work per message, which made bulk submits publish-bound."""
        args = self.task_args()
        message = celery.amqp.as_task_v2(uuid.uuid4().hex, RUN_JOB_TASK, args=args, ignore_result=True,
                                         countdown=countdown, argsrepr=repr(tuple(args)), kwargsrepr="{}")
        with celery.producer_or_acquire(producer) as publisher:
            publisher.publish(message.body, exchange="", routing_key=self.queue, headers=message.headers,
                              priority=broker_priority(self.priority), serializer="json", delivery_mode=2,
                              retry=False, **message.properties)


def publish_all(celery: Celery, messages: Iterable[JobMessage]) -> None:
    """Publish many, pipelined: kombu's publish batch turns thousands of LPUSHes into a few
    round trips on Redis (and is a no-op elsewhere)."""
    with celery.producer_or_acquire() as producer, producer.batch():
        for message in messages:
            message.publish(celery, producer=producer)
