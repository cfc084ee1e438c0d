"""Job messages published as plain LPUSHes are the messages kombu's Redis transport would push, and a real
worker runs them."""

from __future__ import annotations

import json
import uuid

import pytest

from nexus.queueing.broker import priority_keys
from nexus.queueing.message import JobMessage, publish_all, redis_envelope

pytestmark = pytest.mark.timeout(120)


def _popped(redis, queue: str) -> tuple[str, dict]:
    """(the list, the decoded envelope) of the one message on one of the queue's priority lists."""
    found = [(key, raw) for key in priority_keys(queue) if (raw := redis.lpop(key)) is not None]
    assert len(found) == 1, found
    key, raw = found[0]
    return key, json.loads(raw)


def _without_random_ids(envelope: dict) -> dict:
    envelope["properties"].pop("delivery_tag")
    return envelope


@pytest.mark.parametrize("priority", [0, 5, 7, 9])
@pytest.mark.parametrize("lsn", [None, "0/16B3748"])
def test_the_direct_envelope_is_kombus_own(services, priority, lsn):
    queue = f"envelope-test-{uuid.uuid4().hex[:8]}"
    message = JobMessage(str(uuid.uuid4()), 3, queue, priority, lsn)
    task_id = uuid.uuid4().hex
    args = message.task_args()
    task = services.celery.amqp.as_task_v2(task_id, "nexus.run_job", args=args, ignore_result=True,
                                           argsrepr=repr(tuple(args)), kwargsrepr="{}")
    from nexus.queueing.celery_app import broker_priority

    with services.celery.producer_or_acquire() as publisher:  # what JobMessage.publish sends through kombu
        publisher.publish(task.body, exchange="", routing_key=queue, headers=task.headers,
                          priority=broker_priority(priority), serializer="json", delivery_mode=2, retry=False,
                          **task.properties)
    kombu_key, kombu_envelope = _popped(services.redis, queue)
    key, raw = redis_envelope(services.celery, message, task_id=task_id)
    assert key == kombu_key
    assert _without_random_ids(json.loads(raw)) == _without_random_ids(kombu_envelope)


def test_a_worker_runs_directly_published_jobs(services, worker):
    from tests.support import wait_for
    from nexus.jobs import queries

    assert services.submitter.broker is not None  # the API's submitter publishes directly
    rows = services.submitter.submit_many([{"type": "noop", "payload": {"echo": i}} for i in range(3)], "default")

    def finished():
        return all(queries.get_job(services.engine, row.id).state == "succeeded" for row, _ in rows)

    wait_for(finished, timeout=60, what="the directly published jobs to run")
    publish_all(services.celery, [], services.broker)  # nothing to send: no round trip, no error
