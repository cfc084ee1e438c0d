"""What the Redis broker holds, read the way kombu's Redis transport stores it.

kombu keeps a queue as one list per priority step: `queue` for step 0 and `queue:n` for step n
(Nexus sets `priority_steps` 0..9 and the separator ":" in nexus.queueing.celery_app). A message
a worker fetched and has not acknowledged leaves the list for the `unacked` hash,
{delivery tag: JSON [message, exchange, routing key]}, until the worker acks it or kombu restores
it after the visibility timeout. That is where messages in a worker's prefetch are, and messages
delayed by a countdown/ETA (a decline-retry): Celery workers hold those, unacknowledged, until due.
A message is present when it is in either place.

The broker epoch is a marker the reconciler sets; a broker that lost its data lost it too.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import Counter

import redis
from kombu.transport.redis import Channel

from nexus.queueing.celery_app import BROKER_KEY_SEP, PRIORITY_LEVELS, RUN_JOB_TASK

EPOCH_KEY = "nexus:broker-epoch"
UNACKED_KEY = Channel.unacked_key  # kombu's default, which Nexus keeps
SCAN_PAGE = 1000


def priority_keys(queue: str) -> list[str]:
    """The Redis lists of one queue, one per priority step."""
    return [queue] + [f"{queue}{BROKER_KEY_SEP}{step}" for step in range(1, PRIORITY_LEVELS)]


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Celery Redis queue, summed over its priority lists."""
    pipe = client.pipeline(transaction=False)
    for key in priority_keys(queue):
        pipe.llen(key)
    return sum(pipe.execute())


def held_by_queue(client: redis.Redis) -> Counter[str]:
    """Messages fetched by workers and not yet acknowledged, counted by the queue they came from."""
    held: Counter[str] = Counter()
    for entry in client.hvals(UNACKED_KEY):
        _message, _exchange, routing_key = json.loads(entry)
        held[routing_key] += 1
    return held


def job_messages(client: redis.Redis, queue: str) -> set[tuple[str, int]]:
    """(job id, attempt) of every `run_job` message present for `queue`, waiting or held.

    The lists are read before the unacked hash, each from its head: publishers push at the head
    and workers pop at the tail, so a message moving from list to hash meanwhile is seen (maybe
    twice), never skipped. Costs a read of the whole queue: call it only on evidence of a loss."""
    found: set[tuple[str, int]] = set()
    for key in priority_keys(queue):
        start = 0
        while page := client.lrange(key, start, start + SCAN_PAGE - 1):
            found.update(filter(None, map(_job_of, map(json.loads, page))))
            start += len(page)
    for entry in client.hvals(UNACKED_KEY):
        message, _exchange, routing_key = json.loads(entry)
        if routing_key == queue and (job := _job_of(message)):
            found.add(job)
    return found


def _job_of(message: dict) -> tuple[str, int] | None:
    if message.get("headers", {}).get("task") != RUN_JOB_TASK:
        return None
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return str(args[0]), int(args[1])


def read_epoch(client: redis.Redis) -> str | None:
    value = client.get(EPOCH_KEY)
    return value.decode() if isinstance(value, bytes) else value


def start_epoch(client: redis.Redis) -> str:
    """Set a new epoch unless another reconciler just did; the one now in place."""
    client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
    return read_epoch(client)
