"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

Each request becomes a `completion` job on its model's queue; the worker
serving the model writes events to the job's Redis stream and this view
relays them (server-sent events when `stream` is true, one JSON body
otherwise). API keys are Nexus tokens. Every error, including a missing or
bad token, answers in OpenAI's shape {"error": {message, type, param, code}}
so the official SDK raises its usual exceptions. A field the model's backend
cannot honour is refused here, before anything is queued
(nexus.inference.capabilities). The request and response bodies are the
pydantic models of nexus.inference.openai_schema, in the OpenAPI document too.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

from apiflask import APIBlueprint, HTTPError
from flask import Response, after_this_request, jsonify, request, stream_with_context
from flask_limiter.errors import RateLimitExceeded
from sqlalchemy import text

from nexus.api.intake import release_turn
from nexus.api.limits import rate_limit_headers, slots
from nexus.api.security import caller, services
from nexus.api.v1_gate import Outcome, gate
from nexus.auth import Role
from nexus.models import catalog
from nexus.models.admission import NoInstance, Slot
from nexus.inference import openai_schema as schema
from nexus.inference.openai_shapes import (ApiCall, AuthenticationError, ContextLengthExceededError, Endpoint,
                                           ModelBusyError, ModelCard, ModelNotFoundError, ModelUnavailableError,
                                           OpenAIError, SSE_DONE, build_chunk, build_embeddings, build_models_list,
                                           build_response, build_usage_chunk, new_response_id, parse_body, sse_event)
from nexus.inference.streams import GenerationFailed, hub_for, read_batches, stream_key
from nexus.inference.types import EmbeddingResult, GenerationRequest, GenerationResult, StreamDelta, Usage
from nexus.serving.backends import CAPABILITIES
from nexus.jobs import lifecycle
from nexus.jobs.submit import PayloadTooLarge, build_spec

log = logging.getLogger(__name__)

bp = APIBlueprint("openai", __name__, url_prefix="/v1", tag="OpenAI-compatible")

JOB_CHECK_EVERY_SECONDS = 2.0


def _error_response(error: OpenAIError, headers: dict | None = None):
    return jsonify(error.body()), error.status, headers or {}


@bp.errorhandler(OpenAIError)
def _openai_error(error: OpenAIError):
    return _error_response(error)


@bp.errorhandler(HTTPError)
def _http_error(error: HTTPError):
    """Nexus errors raised for /v1 routes (a bad token, a forbidden role) in OpenAI's shape."""
    if error.status_code == 401:
        return _error_response(AuthenticationError(error.message or "invalid API key"))
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    code = (error.extra_data or {}).get("code") or {403: "permission_denied", 404: "not_found", 429: "rate_limit_exceeded",
                                                     503: "unavailable"}.get(error.status_code)
    return _error_response(OpenAIError(error.message or "error", status=error.status_code, type=kind, code=code),
                           error.headers)


@bp.errorhandler(RateLimitExceeded)
def _rate_limited(error: RateLimitExceeded):
    return _error_response(OpenAIError(f"rate limit exceeded: {error.description} per API key", status=429,
                                       type="rate_limit_error", code="rate_limit_exceeded"), rate_limit_headers())


@bp.errorhandler(PayloadTooLarge)
def _too_large(error: PayloadTooLarge):
    return _error_response(OpenAIError(str(error), status=413, code="payload_too_large"))


def _require_submitter() -> None:
    if caller().role not in (Role.ADMIN, Role.SUBMITTER):
        raise OpenAIError("this API key may not run inference (it needs the submitter role)", status=403,
                          type="permission_error", code="permission_denied")


def _card(spec: catalog.ModelSpec) -> ModelCard:
    return ModelCard(spec.name, int(spec.created_at.timestamp()) if spec.created_at else 0, spec.max_model_len)


@bp.get("/models")
@bp.doc(security="bearer", summary="List the models (OpenAI-compatible)")
def list_models():
    with services().statements.connect() as conn:
        models = catalog.list_models(conn)
    return build_models_list([_card(m) for m in models])


@bp.get("/models/<path:name>")
@bp.doc(security="bearer", summary="Describe one model (OpenAI-compatible)")
def get_model(name: str):
    with services().statements.connect() as conn:
        spec = catalog.get_model(conn, name)
    if spec is None:
        raise ModelNotFoundError(f"The model '{name}' does not exist", param="model")
    return _card(spec).as_dict()


@bp.post("/completions")
@bp.doc(security="bearer", summary="Create a completion (OpenAI-compatible)")
def completions():
    return _serve(Endpoint.COMPLETIONS)


@bp.post("/chat/completions")
@bp.doc(security="bearer", summary="Create a chat completion (OpenAI-compatible)")
def chat_completions():
    return _serve(Endpoint.CHAT)


@bp.post("/embeddings")
@bp.doc(security="bearer", summary="Create embeddings (OpenAI-compatible)")
def embeddings():
    return _serve(Endpoint.EMBEDDINGS)


def _serve(endpoint: Endpoint):
    # Refusals keep their order: the rate, the role, the token's stream slots, then the body and the model.
    # Only a request that gets past them all takes its slots, in the gate's one round trip.
    try:
        _require_submitter()
    except OpenAIError:
        gate().count_rate()
        raise
    try:
        body = request.get_json(silent=True)
        if body is None:
            raise OpenAIError("the request body must be JSON (Content-Type: application/json)", code="invalid_json")
        call = parse_body(endpoint, body)
        _check_servable(call)
    except Exception:
        gate().count_rate(caller(), services().settings.max_streams_per_token)
        raise
    job_id = uuid.uuid4()
    hub = hub_for(services().redis)
    subscription = hub.subscribe(job_id, wake=False)  # the gate wakes the hub, before the job exists
    try:
        slot = _enter(call)
    except BaseException:
        hub.unsubscribe(subscription)
        raise
    try:
        _submit(endpoint, body, call, job_id)
        release_turn(request.environ)  # what is left is waiting for the model (nexus.api.intake)
        batches = read_batches(services().redis, job_id, _idle_check(str(job_id), time.monotonic()),
                               subscription=subscription)
        if not call.stream:
            return _complete(call, str(job_id), batches, slot)
        first = next(batches)  # an error before the first token is still a proper HTTP error
    except BaseException:
        hub.unsubscribe(subscription)
        slot.release()
        raise
    if isinstance(first[0], GenerationFailed):
        _forget(str(job_id), slot)
        raise first[0].error
    return Response(stream_with_context(_sse(call, str(job_id), _chain(first, batches), slot)),
                    mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chain(first, rest):
    yield first
    yield from rest


def _enter(call: ApiCall) -> Slot:
    """The token's rate, one of its stream slots (held until the response is closed: the last event of
    a stream, the client going away, or an error answered instead) and a serving slot of the model,
    waiting for one up to the admission bound, else 429: one round trip when there is room
    (nexus.api.v1_gate)."""
    principal, settings, admission = caller(), services().settings, services().admission
    hold = settings.inference_request_timeout_seconds
    entry = gate().enter(principal, call.model, settings.max_streams_per_token, hold, hold + 30,
                         hub_for(services().redis).wake_key, time.time())
    stream_slots = slots("stream")

    @after_this_request
    def release_when_closed(response):
        response.call_on_close(lambda: stream_slots.release(principal, entry.stream_slot))
        return response

    if entry.outcome is Outcome.NO_INSTANCE:
        raise _no_instance(call.model)
    if entry.outcome is Outcome.ADMITTED:
        return Slot(admission, call.model, entry.request_id)
    release_turn(request.environ)  # not while it waits for a slot: requests for other models come in
    try:  # every instance is full: wait for a slot as before
        slot = admission.acquire(call.model, entry.request_id, hold_seconds=hold + 30,
                                 wait_seconds=settings.inference_admission_wait_seconds)
    except NoInstance:
        raise _no_instance(call.model) from None
    if slot is None:
        raise ModelBusyError(f"every instance of model '{call.model}' is busy and none came free within "
                             f"{settings.inference_admission_wait_seconds:g} s; retry later")
    return slot


class _CatalogCache:
    """Each model's catalog entry, reused for Settings.inference_catalog_cache_seconds, read by one
    request at a time: when an entry expires, the request that refreshes it reads the database and
    the others meanwhile answer from the entry it replaces. Every request read it itself before, so
    each expiry in a crowd of thousands sent a checkout per request to the pool at once (the pool
    ran dry for 30 s and /healthz's own database check waited behind them)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, object]] = {}  # model name -> (read at, entry or None)
        self._reading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, name: str, ttl: float, read):
        if ttl <= 0:
            return read(name)
        cached = self._entries.get(name)
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        with self._lock:
            if len(self._entries) > 10_000:  # names are the caller's input: bounded
                self._entries.clear()
                self._reading.clear()
            reading = self._reading.setdefault(name, threading.Lock())
        if cached is not None and not reading.acquire(blocking=False):
            return cached[1]  # another request is refreshing it
        if cached is None:
            reading.acquire()  # nothing to answer from: wait for the read in progress, if any
        try:
            fresh = self._entries.get(name)
            if fresh is not None and time.monotonic() - fresh[0] < ttl:
                return fresh[1]
            spec = read(name)
            self._entries[name] = (time.monotonic(), spec)
            return spec
        finally:
            reading.release()


_catalog_cache = _CatalogCache()


def _read_model(name: str):
    with services().statements.connect() as conn:
        return catalog.get_model(conn, name)


def _model_spec(name: str):
    """The model's catalog entry (nexus.api.openai._CatalogCache)."""
    return _catalog_cache.get(name, services().settings.inference_catalog_cache_seconds, _read_model)


def _check_servable(call: ApiCall) -> None:
    spec = _model_spec(call.model)
    if spec is None:
        raise ModelNotFoundError(f"The model '{call.model}' does not exist; GET /v1/models lists the models",
                                 param="model")
    CAPABILITIES[spec.backend].check(call.request)
    if not isinstance(call.request, GenerationRequest):
        return
    max_tokens = call.request.params.max_tokens
    if spec.max_model_len and max_tokens is not None and max_tokens >= spec.max_model_len:
        raise ContextLengthExceededError(
            f"max_tokens is {max_tokens}, but this model's maximum context length is {spec.max_model_len} tokens "
            "(prompt included)", param="max_tokens")


def _no_instance(model: str) -> ModelUnavailableError:
    return ModelUnavailableError(f"no instance of model '{model}' is serving right now; deploy one with "
                                 f"POST /api/v1/models/{model}/instances", param="model")


def _submit(endpoint: Endpoint, body: dict, call: ApiCall, job_id: uuid.UUID) -> None:
    """The request's job, under the id its stream was subscribed with."""
    job = {"type": "completion", "payload": {"endpoint": endpoint.value, "body": body},
           "requirements": {"model": call.model},
           # A retry after tokens went out would repeat them; a lost request fails and the client retries.
           "max_attempts": 1, "priority": 7}
    submitter = services().submitter
    spec = build_spec(job, submitter.settings, caller().tenant, allow_internal=True)
    submitter.submit_specs([dataclasses.replace(spec, id=job_id)])


def _idle_check(job_id: str, started: float):
    """Runs while no event arrives: give up when the job ended without one, or on timeout."""
    timeout = services().settings.inference_request_timeout_seconds
    watch = _watch()

    def check(_idle_seconds: float) -> None:
        if time.monotonic() - started > timeout:
            _cancel(job_id)
            raise OpenAIError(f"the model did not answer within {timeout:.0f} s", status=504, type="server_error",
                              code="timeout")
        ended = watch.ended(job_id)
        if ended is not None:
            raise ModelUnavailableError(f"the request could not be served: {ended}")

    return check


class _EndedJobs:
    """Which idle requests' jobs ended without a final event: one query per interval for all of them,
    where one per idle stream made thousands of open streams a thousand queries a second."""

    def __init__(self, services_) -> None:
        self._services = services_  # the thread runs outside any app context
        self._asked: dict[str, float] = {}  # job id -> when its stream last asked
        self._ended: dict[str, str] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="nexus-v1-jobs", daemon=True).start()

    def ended(self, job_id: str) -> str | None:
        with self._lock:
            self._asked[job_id] = time.monotonic()
            return self._ended.pop(job_id, None)

    def _run(self) -> None:
        while True:
            time.sleep(JOB_CHECK_EVERY_SECONDS)
            with self._lock:  # a stream that stopped asking has its answer or went away
                cutoff = time.monotonic() - 3 * JOB_CHECK_EVERY_SECONDS
                self._asked = {j: t for j, t in self._asked.items() if t > cutoff}
                self._ended = {j: e for j, e in self._ended.items() if j in self._asked}
                ids = list(self._asked)
            if ids:
                try:
                    self._look(ids)
                except Exception as exc:  # the database is away: the requests time out on their own
                    log.warning("could not read the states of %d waiting requests: %s", len(ids), exc)

    def _look(self, ids: list[str]) -> None:
        with self._services.statements.connect() as conn:
            rows = conn.execute(text("SELECT id, state, error FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
                                     "AND state IN ('failed', 'cancelled')"), {"ids": ids}).all()
        with self._lock:
            for row in rows:
                self._ended[str(row.id)] = row.error or row.state


_watcher: list = []


def _watch() -> _EndedJobs:
    if not _watcher:
        _watcher.append(_EndedJobs(services()))
    return _watcher[0]


def _complete(call: ApiCall, job_id: str, batches, slot: Slot) -> dict:
    try:
        for batch in batches:
            for event in batch:
                if isinstance(event, GenerationFailed):
                    raise event.error
                if isinstance(event, GenerationResult):
                    return build_response(call, event)
                if isinstance(event, EmbeddingResult):
                    return build_embeddings(call, event)
    finally:
        _forget(job_id, slot)
    raise OpenAIError("the worker ended the request without an answer", status=502, type="server_error")


def _sse(call: ApiCall, job_id: str, batches, slot: Slot):
    """One write per batch of what arrived: a chunk per choice with all its new text."""
    response_id, created, started = new_response_id(call.endpoint), int(time.time()), set()
    finished = False
    try:
        for batch in batches:
            out = []
            for event in batch:
                if isinstance(event, StreamDelta):
                    out.append(sse_event(build_chunk(call, response_id, created, event,
                                                     first=event.index not in started)))
                    started.add(event.index)
                elif isinstance(event, Usage):
                    if call.include_usage:
                        out.append(sse_event(build_usage_chunk(call, response_id, created, event)))
                    finished = True
                elif isinstance(event, GenerationFailed):
                    finished = True
                    out.append(sse_event(event.error.body()))
            if finished:
                out.append(SSE_DONE)
            yield "".join(out)
        if not finished:
            yield SSE_DONE
    except OpenAIError as exc:  # timeout or a failed job while streaming: tell the client in the stream
        finished = True
        yield sse_event(exc.body()) + SSE_DONE
    finally:
        if not finished:  # the client went away: stop the generation
            _cancel(job_id)
        _forget(job_id, slot)


_BODIES = {  # path -> (request model, response model) for the OpenAPI document
    "/v1/completions": (schema.CompletionRequest, schema.Completion),
    "/v1/chat/completions": (schema.ChatCompletionRequest, schema.ChatCompletion),
    "/v1/embeddings": (schema.EmbeddingRequest, schema.EmbeddingList),
    "/v1/models": (None, schema.OpenAIModelList),
    "/v1/models/{name}": (None, schema.OpenAIModel),
}


def document_bodies(spec: dict) -> dict:
    """Put the /v1 request and response models into the OpenAPI document (an APIFlask spec processor).

    The views read their bodies themselves, so that a wrong field answers in OpenAI's error shape
    with OpenAI's status (400, not APIFlask's validation error)."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})

    def ref(model) -> dict:
        document = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(document.pop("$defs", {}))
        components[model.__name__] = document
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": ref(schema.Error)}}
    for path, (request_model, response_model) in _BODIES.items():
        operation = next(iter(spec.get("paths", {}).get(path, {}).values()), None)
        if operation is None:
            continue
        if request_model is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request_model)}}}
        operation["responses"] = {
            "200": {"description": "the answer (with `stream`: server-sent events, each a chunk of this shape)",
                    "content": {"application/json": {"schema": ref(response_model)}}},
            "400": {"description": "a wrong or unsupported field, named in `param`", "content": error},
            "401": {"description": "a missing or bad API key", "content": error},
            "404": {"description": "no such model", "content": error},
        }
    ref(schema.ChatCompletionChunk)
    return spec


def _cancel(job_id: str) -> None:
    try:
        with services().engine.begin() as conn:
            lifecycle.request_cancel(conn, job_id, by="client disconnected")
    except Exception as exc:  # best effort: the job finishes on its own otherwise
        log.warning("could not cancel %s: %s", job_id, exc)


def _forget(job_id: str, slot: Slot) -> None:
    """The request ended: its slot goes to the next request, its events are no longer needed."""
    try:
        slot.release()
        services().redis.delete(stream_key(job_id))
    except Exception:  # both lapse on their own
        pass
