"""Generation events from a worker to the API through one Redis stream per job.

A stream (not pub/sub) so that nothing is lost between the API submitting the
job and starting to read: the reader starts from the beginning whenever it
subscribes. The worker writes deltas, then usage (streaming requests) or one
result (the rest), or an error; each stream expires on its own.

    writer = EventWriter(redis, job_id, ttl)      # worker
    for event in read_events(redis, job_id, ...)  # API
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from nexus.inference.openai_shapes import OpenAIError
from nexus.inference.types import Choice, FinishReason, GenerationResult, StreamDelta, Usage

STREAM_KEY = "nexus:gen:{job_id}"


def stream_key(job_id) -> str:
    return STREAM_KEY.format(job_id=job_id)


@dataclass(frozen=True)
class GenerationFailed:
    """An error event: the OpenAI error the worker's backend raised."""

    error: OpenAIError


class EventWriter:
    def __init__(self, client: redis.Redis, job_id, ttl_seconds: int) -> None:
        self._redis, self._key, self._ttl = client, stream_key(job_id), ttl_seconds

    def _add(self, event: dict) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._key, {"e": json.dumps(event, separators=(",", ":"))})
        pipe.expire(self._key, self._ttl)
        pipe.execute()

    def delta(self, delta: StreamDelta) -> None:
        self._add({"t": "delta", "i": delta.index, "x": delta.text,
                   "f": delta.finish_reason.value if delta.finish_reason else None})

    def usage(self, usage: Usage) -> None:
        self._add({"t": "usage", "p": usage.prompt_tokens, "c": usage.completion_tokens})

    def result(self, result: GenerationResult) -> None:
        self._add({"t": "result", "choices": [[c.index, c.text, c.finish_reason.value] for c in result.choices],
                   "p": result.usage.prompt_tokens, "c": result.usage.completion_tokens})

    def error(self, error: OpenAIError) -> None:
        self._add({"t": "error", "status": error.status, "body": error.body()})


def decode_event(event: dict) -> StreamDelta | Usage | GenerationResult | GenerationFailed:
    kind = event["t"]
    if kind == "delta":
        return StreamDelta(event["i"], event["x"], FinishReason(event["f"]) if event["f"] else None)
    if kind == "usage":
        return Usage(event["p"], event["c"])
    if kind == "result":
        choices = tuple(Choice(i, text, FinishReason(reason)) for i, text, reason in event["choices"])
        return GenerationResult(choices, Usage(event["p"], event["c"]))
    body = event["body"]["error"]
    return GenerationFailed(OpenAIError(body["message"], param=body.get("param"), code=body.get("code"),
                                        status=event["status"], type=body.get("type")))


def read_events(client: redis.Redis, job_id, idle_check, block_ms: int = 1000
                ) -> Iterator[StreamDelta | Usage | GenerationResult | GenerationFailed]:
    """Events in order until a final one (usage, result or error). While nothing arrives,
    `idle_check(seconds_idle)` runs every `block_ms`; it raises to give up (job failed, timeout)."""
    key, last_id, idle_since = stream_key(job_id), "0-0", time.monotonic()
    while True:
        reply = client.xread({key: last_id}, count=256, block=block_ms)
        if not reply:
            idle_check(time.monotonic() - idle_since)
            continue
        idle_since = time.monotonic()
        for entry_id, fields in reply[0][1]:
            last_id = entry_id  # the next read starts after this entry
            event = decode_event(json.loads(fields[b"e"] if b"e" in fields else fields["e"]))
            yield event
            if not isinstance(event, StreamDelta):
                return
