"""The one message Nexus puts on a queue: which job, which attempt, and where its rows can be read.

A message carries routing, never data (docs/ARCHITECTURE.md, "Queues carry routing"):
the job's row in PostgreSQL is the truth, and a message whose claim fails is dropped.

    JobMessage(job_id, attempt=1, queue="cpu_only", priority=5).publish(celery)
    publish_all(celery, messages, broker=client)  # LPUSHes of kombu's envelope on a Redis client
    message = JobMessage.from_task_args(args)     # the worker's side: run_job(*args)
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import redis
from celery import Celery
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps

from nexus.queueing.celery_app import BROKER_KEY_SEP, PRIORITY_LEVELS, RUN_JOB_TASK, broker_priority


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


def publish_all(celery: Celery, messages: Iterable[JobMessage], broker: redis.Redis | None = None) -> None:
    """Publish many, pipelined: kombu's publish batch turns thousands of LPUSHes into a few
    round trips on Redis (and is a no-op elsewhere). With `broker` (a redis client of the
    broker's Redis), the envelopes go out on it instead, in one pipeline (`redis_envelope`)."""
    if broker is not None:
        pipe = broker.pipeline(transaction=False)
        for message in messages:
            pipe.lpush(*redis_envelope(celery, message))
        pipe.execute()
        return
    with celery.producer_or_acquire() as producer, producer.batch():
        for message in messages:
            message.publish(celery, producer=producer)


def redis_envelope(celery: Celery, message: JobMessage, task_id: str | None = None) -> tuple[str, str]:
    """(the Redis list, the JSON) that kombu's Redis transport would LPUSH for this message.

    Built here, without kombu's producer: its pool, channel and serializer registry cost ~0.35 ms of
    CPU per message, six times the LPUSH itself, on the path of every /v1 request's first token.
    The same steps as kombu's Producer.publish and its Redis channel's basic_publish (celery's
    protocol 2 message, JSON, base64 body, a delivery tag, the priority's list);
    tests/unit/test_queueing.py compares both byte for byte, so a kombu that changes its
    envelope fails there, not in production."""
    args = message.task_args()
    task = celery.amqp.as_task_v2(task_id or uuid.uuid4().hex, RUN_JOB_TASK, args=args, ignore_result=True,
                                  argsrepr=repr(tuple(args)), kwargsrepr="{}")
    content_type, content_encoding, body = serialize(task.body, serializer="json")
    priority = broker_priority(message.priority)
    properties = {**task.properties, "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": message.queue},
                  "priority": priority, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}
    envelope = {"body": base64.b64encode(body.encode(content_encoding)).decode(), "content-encoding": content_encoding,
                "content-type": content_type, "headers": task.headers, "properties": properties}
    step = max(0, min(priority, PRIORITY_LEVELS - 1))
    key = f"{message.queue}{BROKER_KEY_SEP}{step}" if step else message.queue
    return key, json_dumps(envelope)
