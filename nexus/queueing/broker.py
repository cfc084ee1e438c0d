"""What the Redis broker holds, read the way kombu's Redis transport stores it.

kombu keeps a queue as one list per priority step: `queue` for step 0 and `queue:n` for step n
(Nexus sets `priority_steps` 0..9 and the separator ":" in nexus.queueing.celery_app). A message
a worker fetched and has not acknowledged leaves the list for the `unacked` hash,
{delivery tag: JSON [message, exchange, routing key]}, until the worker acks it or kombu restores
it after the visibility timeout. That is where messages in a worker's prefetch are, and messages
delayed by a countdown/ETA (a decline-retry): Celery workers hold those, unacknowledged, until due.
A message is present when it is in either place, with one exception: a message held longer than
`HELD_FRESH_SECONDS` past its delivery (or its ETA) is not counted. A live worker starts what it
holds at once (prefetch multiplier 1: it holds only what it runs), so a message held that long
belongs to a worker that was killed: its job waits, and only the visibility timeout (hours) would
give the message back. Counting it as present left such jobs queued until then.

The broker epoch is a marker the reconciler sets; a broker that lost its data lost it too.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from datetime import datetime
from typing import Any, Iterator

import redis
from kombu.transport.redis import Channel

from nexus.queueing.celery_app import BROKER_KEY_SEP, PRIORITY_LEVELS, RUN_JOB_TASK

EPOCH_KEY = "nexus:broker-epoch"
UNACKED_KEY = Channel.unacked_key  # kombu's default, which Nexus keeps
UNACKED_INDEX_KEY = Channel.unacked_index_key  # delivery tag -> when it was delivered
HELD_FRESH_SECONDS = 30.0
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


def decoded(value: bytes | str) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def held_messages(client: redis.Redis, now: float | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """(message, routing key) of each message a live worker holds unacknowledged (see the module doc)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(UNACKED_KEY)
    pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
    entries, delivered = pipe.execute()
    delivered_at = {decoded(tag): score for tag, score in delivered}
    now = time.time() if now is None else now
    for tag, entry in entries.items():
        message, _exchange, routing_key = json.loads(entry)
        since = max(delivered_at.get(decoded(tag), now), _eta(message))
        if now - since <= HELD_FRESH_SECONDS:
            yield message, routing_key


def held_by_queue(client: redis.Redis) -> Counter[str]:
    """Messages live workers fetched and have not yet acknowledged, counted by the queue they came from."""
    return Counter(routing_key for _message, routing_key in held_messages(client))


def held_jobs(client: redis.Redis) -> dict[str, set[tuple[str, int]]]:
    """(job id, attempt) of each `run_job` message live workers hold, by the queue it came from."""
    found: dict[str, set[tuple[str, int]]] = {}
    for message, routing_key in held_messages(client):
        if job := _job_of(message):
            found.setdefault(routing_key, set()).add(job)
    return found


def _eta(message: dict[str, Any]) -> float:
    """When a countdown/ETA message is due (0 for one without)."""
    eta = message.get("headers", {}).get("eta")
    try:
        return datetime.fromisoformat(eta).timestamp() if eta else 0.0
    except (TypeError, ValueError):
        return 0.0


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
    for message, routing_key in held_messages(client):
        if routing_key == queue and (job := _job_of(message)):
            found.add(job)
    return found


def _job_of(message: dict[str, Any]) -> tuple[str, int] | None:
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
    epoch = uuid.uuid4().hex
    client.set(EPOCH_KEY, epoch, nx=True)
    return read_epoch(client) or epoch  # None only if the key vanished again at once: ours stands
