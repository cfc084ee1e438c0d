"""Generation events from a worker to the API through one Redis stream per job.

A stream (not pub/sub) so that nothing is lost between the API submitting the
job and starting to read: the reader starts from the beginning whenever it
subscribes. The worker writes deltas, then usage (streaming requests) or one
result (the rest), or an error; each stream expires on its own. An entry holds
all the text a request produced since the last one (one engine step or
`inference_stream_interval_ms`), so the hops per token are a fraction of one.

    writer = EventWriter(redis, job_id, ttl)      # worker
    for event in read_events(redis, job_id, ...)  # API
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from nexus.inference.openai_shapes import OpenAIError
from nexus.inference.types import (Choice, EmbeddingResult, FinishReason, GenerationResult, StreamDelta, Usage,
                                   merge_logprobs)

log = logging.getLogger(__name__)

STREAM_KEY = "nexus:gen:{job_id}"
WAKE_TTL_SECONDS = 60  # a hub's wake stream outlives its last subscription by this much


def stream_key(job_id) -> str:
    return STREAM_KEY.format(job_id=job_id)


@dataclass(frozen=True)
class GenerationFailed:
    """An error event: the OpenAI error the worker's backend raised."""

    error: OpenAIError


class EventWriter:
    """One job's events. The first delta and the final event go out at once, the final one after
    whatever was buffered; the text between is buffered and written once per `interval_ms`, all
    pending jobs of the process in one pipeline, by whoever drives the writes: the engine loop
    between its steps (`StepFlusher`) when the backend feeds the writer itself, else the process's
    flusher thread. interval_ms 0: every delta at once."""

    def __init__(self, client: redis.Redis, job_id, ttl_seconds: int, interval_ms: float = 0) -> None:
        self._redis, self._key, self._ttl = client, stream_key(job_id), ttl_seconds
        self.interval = interval_ms / 1000
        self._lock = threading.Lock()  # the flusher writes this buffer too: entries stay in order
        self._pending: list[list] = []  # [index, text, finish] per choice, merged while consecutive
        self._started = False
        self._ttl_set_at: float | None = None  # when the key's expiry was last set (time.monotonic)

    def _add(self, event: dict) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self._queue(pipe, event)
        pipe.execute()

    def _queue(self, pipe, event: dict) -> None:
        pipe.xadd(self._key, {"e": json.dumps(event, separators=(",", ":"))})
        # The expiry is set with the first entry and renewed at half its life, not with every entry:
        # an EXPIRE per entry was half the commands of a busy worker's pipelines.
        now = time.monotonic()
        if self._ttl_set_at is None or now - self._ttl_set_at > self._ttl / 2:
            pipe.expire(self._key, self._ttl)
            self._ttl_set_at = now

    def delta(self, delta: StreamDelta) -> None:
        """From the thread that reads the backend's stream: written at once or by the flusher thread."""
        if self.buffer(delta):
            self.flush()
        else:
            _flusher_for(self._redis, self.interval).watch(self)

    def buffer(self, delta: StreamDelta) -> bool:
        """Add the delta to what waits to be written; True when it is due at once (the request's first
        text: time to first token, or no interval)."""
        entry = _delta_entry(delta)
        with self._lock:
            due = not self._started or not self.interval
            self._started = True
            last = self._pending[-1] if self._pending else None
            if last is not None and last[0] == delta.index and last[2] is None and _mergeable(last, entry):
                last[1] += delta.text
                last[2] = entry[2]
                if len(entry) > 3:
                    last[3] = merge_logprobs(last[3], entry[3])
            else:
                self._pending.append(entry)
        return due

    def flush(self) -> None:
        with self._lock:
            pipe = self._redis.pipeline(transaction=False)
            if self.flush_into(pipe):
                pipe.execute()

    def flush_into(self, pipe) -> bool:
        """Queue the buffered deltas on `pipe` (the caller holds `self._lock`); False when none."""
        if not self._pending:
            return False
        self._queue(pipe, {"t": "deltas", "d": self._pending})
        self._pending = []
        return True

    def _final(self, event: dict) -> None:
        with self._lock:
            pipe = self._redis.pipeline(transaction=False)
            self.flush_into(pipe)
            self._queue(pipe, event)
            pipe.execute()

    def usage(self, usage: Usage) -> None:
        self._final({"t": "usage", "p": usage.prompt_tokens, "c": usage.completion_tokens})

    def result(self, result: GenerationResult) -> None:
        self._final({"t": "result", "choices": [_choice_entry(c) for c in result.choices],
                     "p": result.usage.prompt_tokens, "c": result.usage.completion_tokens})

    def embeddings(self, result: EmbeddingResult) -> None:
        self._final({"t": "embeddings", "v": [base64.b64encode(v).decode() for v in result.vectors],
                     "p": result.prompt_tokens})

    def error(self, error: OpenAIError) -> None:
        self._final({"t": "error", "status": error.status, "body": error.body()})


def write_pending(writers) -> None:
    """Write what each writer buffered: one pipeline per Redis client for all of them."""
    by_client: dict[int, tuple[redis.Redis, list[EventWriter]]] = {}
    for writer in writers:
        by_client.setdefault(id(writer._redis), (writer._redis, []))[1].append(writer)
    for client, group in by_client.values():
        locks = [w._lock for w in group]
        for lock in locks:  # request threads only ever hold their own writer's lock: no cycle
            lock.acquire()
        try:
            pipe = client.pipeline(transaction=False)
            if any([w.flush_into(pipe) for w in group]):
                pipe.execute()
        except Exception as exc:  # Redis away: those requests fail on their own final write
            log.warning("could not write buffered stream text: %s", exc)
        finally:
            for lock in locks:
                lock.release()


class StepFlusher:
    """The writes of an engine loop that feeds EventWriters itself (nexus.serving.backends.transformers_backend).

    The loop buffers each request's text as it decodes and calls `after_step()` between steps,
    which writes, in one pipeline: at once when some request has its first text (time to first
    token), else once per interval. A flusher thread did this before, and woke to take the GIL
    from the engine in the middle of its steps; here the writes happen where the engine would
    wait anyway, and no request thread wakes per token. Used by the loop's thread only."""

    def __init__(self) -> None:
        self._waiting: dict[EventWriter, None] = {}  # insertion-ordered set
        self._due = False
        self._interval = 0.0
        self._last = 0.0

    def add(self, writer: EventWriter, delta: StreamDelta) -> None:
        if writer.buffer(delta):
            self._due = True
        if not self._waiting:
            self._interval = writer.interval
        elif writer.interval < self._interval:
            self._interval = writer.interval
        self._waiting[writer] = None

    def after_step(self) -> None:
        if not self._waiting:
            return
        now = time.monotonic()
        if not self._due and now - self._last < self._interval:
            return
        writers, self._waiting, self._due, self._last = self._waiting, {}, False, now
        write_pending(writers)


def _delta_entry(delta: StreamDelta) -> list:
    """[index, text, finish] and, only when there are any, its logprobs and extra fields: the
    plain text of a stream stays as small as it was."""
    entry: list = [delta.index, delta.text, delta.finish_reason.value if delta.finish_reason else None]
    if delta.logprobs is not None or delta.extra is not None:
        entry.append(delta.logprobs)
    if delta.extra is not None:
        entry.append(delta.extra)
    return entry


def _mergeable(last: list, entry: list) -> bool:
    """Text merges with text, logprobs with logprobs; a delta with extra fields (tool calls) never merges."""
    return len(last) == len(entry) and len(entry) <= 4


def _choice_entry(choice: Choice) -> list:
    entry: list = [choice.index, choice.text, choice.finish_reason.value]
    if choice.logprobs is not None or choice.extra is not None:
        entry += [choice.logprobs, choice.extra]
    return entry


def _delta_from(entry: list) -> StreamDelta:
    index, text, finish = entry[0], entry[1], entry[2]
    return StreamDelta(index, text, FinishReason(finish) if finish else None,
                       entry[3] if len(entry) > 3 else None, entry[4] if len(entry) > 4 else None)


def _choice_from(entry: list) -> Choice:
    return Choice(entry[0], entry[1], FinishReason(entry[2]), entry[3] if len(entry) > 3 else None,
                  entry[4] if len(entry) > 4 else None)


class _Flusher:
    """One thread per process and Redis client: every interval, one pipeline writes the deltas that
    all in-flight requests buffered since the last tick (per engine step, not per token)."""

    def __init__(self, client: redis.Redis, interval: float) -> None:
        self._redis, self._interval = client, interval
        self._waiting: set[EventWriter] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="nexus-stream-flusher", daemon=True).start()

    def watch(self, writer: EventWriter) -> None:
        with self._lock:
            self._waiting.add(writer)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                writers, self._waiting = self._waiting, set()
            if writers:
                self._flush(writers)

    def _flush(self, writers: set[EventWriter]) -> None:
        write_pending(writers)


_flushers: dict[tuple[int, float], _Flusher] = {}
_flushers_lock = threading.Lock()


def _flusher_for(client: redis.Redis, interval: float) -> _Flusher:
    with _flushers_lock:
        flusher = _flushers.get((id(client), interval))
        if flusher is None:
            flusher = _flushers[(id(client), interval)] = _Flusher(client, interval)
        return flusher


Event = StreamDelta | Usage | GenerationResult | EmbeddingResult | GenerationFailed
FINAL_EVENTS = (Usage, GenerationResult, EmbeddingResult, GenerationFailed)


def decode_event(event: dict) -> list[Event]:
    kind = event["t"]
    if kind == "deltas":
        return [_delta_from(entry) for entry in event["d"]]
    if kind == "delta":  # one token per entry, from a worker of an earlier version
        return [StreamDelta(event["i"], event["x"], FinishReason(event["f"]) if event["f"] else None)]
    if kind == "usage":
        return [Usage(event["p"], event["c"])]
    if kind == "result":
        return [GenerationResult(tuple(_choice_from(c) for c in event["choices"]), Usage(event["p"], event["c"]))]
    if kind == "embeddings":
        return [EmbeddingResult(tuple(base64.b64decode(v) for v in event["v"]), event["p"])]
    body = event["body"]["error"]
    return [GenerationFailed(OpenAIError(body["message"], param=body.get("param"), code=body.get("code"),
                                         status=event["status"], type=body.get("type")))]


def merge_deltas(events: list[Event]) -> list[Event]:
    """One delta per choice (its texts and logprobs joined, the last finish reason), then the other
    events in order. A delta with extra fields (tool calls) stays one of its own, in its place."""
    deltas: list[StreamDelta] = []
    open_at: dict[int, int] = {}  # choice -> the position of its delta that later text may join
    rest: list[Event] = []
    for event in events:
        if not isinstance(event, StreamDelta):
            rest.append(event)
            continue
        at = open_at.get(event.index)
        if at is None or event.extra is not None:
            open_at.pop(event.index, None)
            if event.extra is None:
                open_at[event.index] = len(deltas)
            deltas.append(event)
            continue
        before = deltas[at]
        logprobs = before.logprobs if event.logprobs is None else merge_logprobs(before.logprobs, event.logprobs)
        deltas[at] = StreamDelta(event.index, before.text + event.text, event.finish_reason or before.finish_reason,
                                 logprobs)
    return [*deltas, *rest]


class StreamHub:
    """One blocking XREAD per process for every generation stream its requests are reading.

    With an XREAD per request, 2,000 open streams held 2,000 Redis connections and
    every engine step cost one round trip per stream. The hub's loop reads all of
    them in one command and hands each request what arrived for it; a request that
    subscribes appends to the hub's own wake stream, which is part of every read,
    so the loop starts over with the new key at once (the request's first text then
    arrives through the next read). Entries are delivered in order and none is
    missed: each subscription's read starts after the last entry it was given. The
    loop runs while someone is subscribed and stops when nobody is.
    """

    def __init__(self, client: redis.Redis, block_ms: int = 1000) -> None:
        self._client, self._block_ms = client, block_ms
        self._wake_key = f"nexus:gen-wake:{uuid.uuid4().hex}"
        self._subscriptions: dict[str, _Subscription] = {}
        self._lock = threading.Lock()
        self._reading = False  # the loop runs

    @property
    def wake_key(self) -> str:
        """The stream whose new entry makes the loop read again, now with every subscription."""
        return self._wake_key

    def subscribe(self, job_id, wake: bool = True) -> "_Subscription":
        """Read the job's stream from its start. `wake=False`: the caller appends to `wake_key` itself
        (the /v1 gate does, in the round trip that admits the request, before the job exists)."""
        subscription = _Subscription(stream_key(job_id))
        with self._lock:
            self._subscriptions[subscription.key] = subscription
            if not self._reading:
                self._reading = True
                threading.Thread(target=self._run, name="nexus-stream-hub", daemon=True).start()
        if wake:
            self.wake()
        return subscription

    def wake(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": 1}, maxlen=1)
        pipe.expire(self._wake_key, WAKE_TTL_SECONDS)
        pipe.execute()

    def unsubscribe(self, subscription: "_Subscription") -> None:
        with self._lock:
            if self._subscriptions.get(subscription.key) is subscription:
                del self._subscriptions[subscription.key]

    def _run(self) -> None:
        wake_from = "0-0"
        while True:
            with self._lock:
                if not self._subscriptions:
                    self._reading = False
                    return
                streams = {self._wake_key: wake_from, **{k: s.read_from for k, s in self._subscriptions.items()}}
            try:
                reply = self._client.xread(streams, count=1024, block=self._block_ms)
            except (redis.RedisError, OSError) as exc:  # Redis away: each request times out on its own
                log.warning("could not read the generation streams: %s", exc)
                time.sleep(0.2)
                continue
            for key, entries in reply or ():
                key = key.decode() if isinstance(key, bytes) else key
                if key == self._wake_key:
                    wake_from = entries[-1][0]
                    continue
                with self._lock:
                    subscription = self._subscriptions.get(key)
                if subscription is not None:
                    subscription.read_from = entries[-1][0]
                    subscription.arrived.put(entries)


class _Subscription:
    def __init__(self, key: str) -> None:
        self.key, self.read_from = key, "0-0"
        self.arrived: queue.Queue = queue.Queue()


_hubs: dict[int, StreamHub] = {}
_hubs_lock = threading.Lock()


def hub_for(client: redis.Redis) -> StreamHub:
    with _hubs_lock:
        hub = _hubs.get(id(client))
        if hub is None:
            hub = _hubs[id(client)] = StreamHub(client)
        return hub


def read_batches(client: redis.Redis, job_id, idle_check, block_ms: int = 1000,
                 subscription: "_Subscription | None" = None) -> Iterator[list[Event]]:
    """What arrived since the last read, deltas merged per choice, until a final event (usage,
    result or error). While nothing arrives, `idle_check(seconds_idle)` runs every `block_ms`;
    it raises to give up (job failed, timeout). Reads through the process's StreamHub, with
    `subscription` when the caller subscribed already (hub_for(client).subscribe)."""
    hub = hub_for(client)
    if subscription is None:
        subscription = hub.subscribe(job_id)
    idle_since = time.monotonic()
    try:
        while True:
            try:
                entries = subscription.arrived.get(timeout=block_ms / 1000)
            except queue.Empty:
                idle_check(time.monotonic() - idle_since)
                continue
            while not subscription.arrived.empty():  # all that is here goes out as one batch
                entries = entries + subscription.arrived.get_nowait()
            idle_since = time.monotonic()
            batch: list[Event] = []
            for _, fields in entries:
                batch += decode_event(json.loads(fields[b"e"] if b"e" in fields else fields["e"]))
                if isinstance(batch[-1], FINAL_EVENTS):
                    break
            yield merge_deltas(batch)
            if isinstance(batch[-1], FINAL_EVENTS):
                return
    finally:  # also when the reader stops early (the client went away): the generator is closed
        hub.unsubscribe(subscription)


def read_events(client: redis.Redis, job_id, idle_check, block_ms: int = 1000) -> Iterator[Event]:
    """The same events one by one."""
    for batch in read_batches(client, job_id, idle_check, block_ms):
        yield from batch
