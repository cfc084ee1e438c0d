"""The `completion` job type: one OpenAI request (a completion, a chat or embeddings), run by the
worker that serves its model.

The /v1 API submits one per request (queue `model.<name>`); the handler runs
the backend and writes the events the API relays (deltas and usage when
streaming, one result otherwise) to the job's Redis stream: the first delta at
once, then the text of each `inference_stream_interval_ms` as one entry. A request the
backend rejects (too long, bad parameters) becomes an error event and a
failed job that is not retried; it counts against the node only when the
backend itself failed (RequestRejected.failure_kind).
"""

from __future__ import annotations

from typing import Any

from nexus.serving import host as serving
from nexus.inference.openai_shapes import ApiCall, Endpoint, OpenAIError, parse_body
from nexus.inference.streams import EventWriter
from nexus.inference.types import EmbeddingRequest
from nexus.jobs.context import JobContext
from nexus.jobs.failures import FailureKind
from nexus.jobs.registry import JobType


class RequestRejected(ValueError):
    """The backend refused or failed the request; ValueError so the job is not retried (its client
    already has the error event).

    `failure_kind` (nexus.jobs.failures): a 4xx (too long, bad parameters) is the request's own failure;
    a 5xx (model server crashed, unreachable, engine down) is the node's and counts toward its quarantine.
    """

    def __init__(self, error: OpenAIError) -> None:
        super().__init__(f"{error.code or error.type}: {error.message}")
        self.failure_kind = FailureKind.INFRASTRUCTURE if error.status >= 500 else FailureKind.JOB


def parse_payload(payload: Any) -> ApiCall:
    if not isinstance(payload, dict) or set(payload) != {"endpoint", "body"}:
        raise ValueError('payload must be {"endpoint": "completions" | "chat.completions" | "embeddings", '
                         '"body": {...}}')
    try:
        endpoint = Endpoint(payload["endpoint"])
    except ValueError:
        raise ValueError(f"endpoint must be one of {[e.value for e in Endpoint]}") from None
    try:
        return parse_body(endpoint, payload["body"])
    except OpenAIError as exc:
        raise ValueError(exc.message) from None


def validate_completion(payload: Any) -> dict:
    parse_payload(payload)
    return payload


def run_completion(ctx: JobContext, payload: dict) -> dict:
    call = parse_payload(payload)
    server = serving.current()
    backend = server.backend_for(call.model)
    events = EventWriter(server.redis, ctx.job_id, ctx.settings.inference_stream_ttl_seconds,
                         ctx.settings.inference_stream_interval_ms)
    try:
        if isinstance(call.request, EmbeddingRequest):
            embedded = backend.embed(call.request)
            events.embeddings(embedded)
            return {"usage": {"prompt_tokens": embedded.prompt_tokens}, "inputs": len(embedded.vectors)}
        if call.stream:
            usage = backend.stream_into(call.request, events, ctx.check_cancelled)
            if usage is not None:
                events.usage(usage)
            return {"usage": usage.as_dict() if usage else None}
        result = backend.generate(call.request)
    except OpenAIError as exc:
        events.error(exc)
        raise RequestRejected(exc) from None
    events.result(result)
    return {"usage": result.usage.as_dict(), "choices": len(result.choices)}


# Internal: the /v1 routes create it and relay its stream; submitted directly, nobody would read it.
completion = JobType(name="completion", run=run_completion, validate=validate_completion, accepts_input=False,
                     public=False, fair_share=False)
