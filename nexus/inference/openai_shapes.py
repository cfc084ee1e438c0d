"""OpenAI wire shapes: validate request bodies, build responses, stream chunks and errors.

Bodies are validated through the pydantic models of `openai_schema` (a wrong
field is a 400 naming it, as OpenAI names parameters) into the value types the
backends take; responses are built as plain dicts. The /v1 blueprint, the batch
runner and the model server all use these, so every surface answers in the
same shape the official `openai` SDK expects.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from array import array
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import pydantic

from nexus.inference import openai_schema as schema
from nexus.inference.types import (
    ChatMessage,
    Choice,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    GenerationResult,
    Prompt,
    SamplingParams,
    StreamDelta,
    Usage,
)

M = TypeVar("M", bound=pydantic.BaseModel)

SSE_DONE = "data: [DONE]\n\n"


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat.completions"
    EMBEDDINGS = "embeddings"


class OpenAIError(Exception):
    """An error the API returns as `{"error": {message, type, param, code}}` with `status`."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.code
        self.status = status if status is not None else self.status
        self.type = type if type is not None else self.type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(OpenAIError):
    code = "invalid_value"


class ContextLengthExceededError(OpenAIError):
    code = "context_length_exceeded"


class UnsupportedParameterError(OpenAIError):
    """A field the model's backend cannot honour: refused by name, never ignored."""

    code = "unsupported_parameter"


class ModelNotFoundError(OpenAIError):
    status = 404
    code = "model_not_found"


class AuthenticationError(OpenAIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelUnavailableError(OpenAIError):
    """The model is known but no instance is serving it right now."""

    status = 503
    type = "service_unavailable_error"
    code = "model_unavailable"


class ModelBusyError(OpenAIError):
    """Every instance of the model is at its max_concurrent and no slot came free within the wait."""

    status = 429
    type = "requests"  # OpenAI's type for request-rate limits; the SDK raises RateLimitError on 429
    code = "rate_limit_exceeded"


class BackendError(OpenAIError):
    status = 502
    type = "server_error"
    code = "backend_error"


@dataclass(frozen=True)
class ApiCall:
    """A validated /v1 request body."""

    endpoint: Endpoint
    model: str
    request: GenerationRequest | EmbeddingRequest
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage

    @property
    def generation(self) -> GenerationRequest:
        assert isinstance(self.request, GenerationRequest), "an embeddings call has no generation request"
        return self.request


# --- request validation -------------------------------------------------------


def parse_completion_body(body: Any) -> ApiCall:
    request = _validate(schema.CompletionRequest, body)
    prompt = _prompt(request.prompt)
    params = _sampling(request, request.max_tokens, request.logprobs)
    return _api_call(Endpoint.COMPLETIONS, request, GenerationRequest(prompt=prompt, params=params, body=body))


def parse_chat_body(body: Any) -> ApiCall:
    request = _validate(schema.ChatCompletionRequest, body)
    messages = tuple(ChatMessage(m.role, _message_text(m.content)) for m in request.messages)
    max_tokens = request.max_tokens if request.max_tokens is not None else request.max_completion_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = _sampling(request, max_tokens, logprobs)
    return _api_call(Endpoint.CHAT, request, GenerationRequest(messages=messages, params=params, body=body))


def parse_embedding_body(body: Any) -> ApiCall:
    request = _validate(schema.EmbeddingRequest, body)
    inputs = _prompt(request.input, "input")
    return ApiCall(Endpoint.EMBEDDINGS, request.model,
                   EmbeddingRequest((inputs,) if isinstance(inputs, str) else inputs, body=body))


_PARSERS = {Endpoint.COMPLETIONS: parse_completion_body, Endpoint.CHAT: parse_chat_body,
            Endpoint.EMBEDDINGS: parse_embedding_body}


def parse_body(endpoint: Endpoint, body: Any) -> ApiCall:
    return _PARSERS[endpoint](body)


def _validate(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: pydantic.ValidationError) -> InvalidRequestError:
    """The first wrong field, named as OpenAI names parameters (`messages[0].role`)."""
    errors = exc.errors(include_url=False)
    param = _param(errors[0]["loc"])
    same = [e for e in errors if _param(e["loc"]) == param]
    if errors[0]["type"] == "missing":
        return InvalidRequestError(f"'{param}' is required", param=param, code="missing_required_parameter")
    if len(same) > 1:  # a field of several accepted shapes matched none of them
        shapes = ", ".join(dict.fromkeys(_shape(e["loc"]) for e in same))
        return InvalidRequestError(f"'{param}' must be one of: {shapes}", param=param, code="invalid_type")
    kind = "invalid_type" if errors[0]["type"].endswith(("_type", "_parsing")) else "invalid_value"
    return InvalidRequestError(f"'{param}': {errors[0]['msg']}", param=param, code=kind)


def _shape(loc: tuple) -> str:
    """The union member an error is about (pydantic's tag in the location: `str`, `list[int]`…)."""
    return next((str(p) for p in loc if isinstance(p, str) and p not in schema.FIELD_NAMES), "?")


def _param(loc: tuple) -> str:
    """A pydantic location as a parameter name, without the union-member tags it inserts."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in schema.FIELD_NAMES:
            out += f".{part}" if out else part
        else:
            break
    return out


def _prompt(prompt: str | list, param: str = "prompt") -> str | tuple[Prompt, ...]:
    """A text, or each prompt of a list: texts and token-id tuples. A list of one text is that text."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(t, int) for t in prompt):
        return (tuple(prompt),)  # one prompt as token ids
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not prompt:
        raise InvalidRequestError(f"'{param}' is an empty list", param=param)
    return tuple(p if isinstance(p, str) else tuple(p) for p in prompt)


def _message_text(content: str | list[schema.ContentPart] | None) -> str:
    """The text of a message; parts that are not text stay in the request's body for engines that take them."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text or "" for p in content if p.type == "text")


def _sampling(request: schema.CompletionRequest | schema.ChatCompletionRequest, max_tokens: int | None,
              logprobs: int | None) -> SamplingParams:
    bias = tuple((_token_id(k), v) for k, v in (request.logit_bias or {}).items())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=(request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ()),
        n=request.n or 1,
        seed=request.seed,
        logprobs=logprobs,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=bias,
    )


def _token_id(key: str) -> int:
    if not key.isdigit():
        raise InvalidRequestError(f"logit_bias keys are token ids, got {key!r}", param="logit_bias")
    return int(key)


def _api_call(endpoint: Endpoint, request: schema.CompletionRequest | schema.ChatCompletionRequest,
              generation: GenerationRequest) -> ApiCall:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ApiCall(endpoint, request.model, generation, bool(request.stream), include_usage)


# --- responses ----------------------------------------------------------------


def new_response_id(endpoint: Endpoint) -> str:
    prefix = "chatcmpl" if endpoint is Endpoint.CHAT else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def build_response(call: ApiCall, result: GenerationResult, response_id: str | None = None,
                   created: int | None = None) -> dict[str, Any]:
    chat = call.endpoint is Endpoint.CHAT
    return {
        "id": response_id or new_response_id(call.endpoint),
        "object": "chat.completion" if chat else "text_completion",
        "created": created if created is not None else int(time.time()),
        "model": call.model,
        "choices": [_chat_choice(c) if chat else _completion_choice(c) for c in result.choices],
        "usage": result.usage.as_dict(),
    }


def _completion_choice(choice: Choice) -> dict[str, Any]:
    return {"index": choice.index, "text": choice.text, "logprobs": choice.logprobs,
            "finish_reason": choice.finish_reason.value}


def _chat_choice(choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.extra:
        message.update(choice.extra)
        if not choice.text and message.get("tool_calls"):
            message["content"] = None  # as OpenAI answers a message that is only tool calls
    return {"index": choice.index, "message": message, "logprobs": choice.logprobs,
            "finish_reason": choice.finish_reason.value}


def build_chunk(call: ApiCall, response_id: str, created: int, delta: StreamDelta,
                first: bool = False) -> dict[str, Any]:
    """One streamed chunk; `first` marks the first chunk of a chat choice (it carries the role).
    With stream_options.include_usage every chunk but the last has `usage: null`, as OpenAI sends it."""
    finish = delta.finish_reason.value if delta.finish_reason else None
    if call.endpoint is Endpoint.CHAT:
        content: dict[str, Any] = {"role": "assistant"} if first else {}
        if delta.text or not first:
            content["content"] = delta.text
        if delta.extra:
            content.update(delta.extra)
        choice = {"index": delta.index, "delta": content, "logprobs": delta.logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": delta.index, "text": delta.text, "logprobs": delta.logprobs, "finish_reason": finish}
        obj = "text_completion"
    chunk = {"id": response_id, "object": obj, "created": created, "model": call.model, "choices": [choice]}
    if call.include_usage:
        chunk["usage"] = None
    return chunk


def build_usage_chunk(call: ApiCall, response_id: str, created: int, usage: Usage) -> dict[str, Any]:
    obj = "chat.completion.chunk" if call.endpoint is Endpoint.CHAT else "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": call.model, "choices": [],
            "usage": usage.as_dict()}


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def build_embeddings(call: ApiCall, result: EmbeddingResult) -> dict[str, Any]:
    """The embeddings list, each vector as floats or, as the client asked, base64 of float32."""
    as_base64 = call.request.body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(vector).decode() if as_base64 else floats(vector)}
            for i, vector in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


def floats(vector: bytes) -> list[float]:
    values = array("f")
    values.frombytes(vector)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def float32_bytes(values) -> bytes:
    """Little-endian float32 bytes of a sequence of numbers."""
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


@dataclass(frozen=True)
class ModelCard:
    """What /v1/models says about one model."""

    id: str
    created: int  # when it was declared, seconds since the epoch
    max_model_len: int | None = None
    owned_by: str = "nexus"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by,
                "max_model_len": self.max_model_len}


def build_models_list(cards: list[ModelCard]) -> dict[str, Any]:
    return {"object": "list", "data": [card.as_dict() for card in cards]}


def error_from_body(status: int, body: Any) -> OpenAIError:
    """Rebuild the typed error another OpenAI-compatible server answered with."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return OpenAIError(str(error.get("message", "")), param=error.get("param"), code=error.get("code"),
                           status=status, type=error.get("type") or "invalid_request_error")
    # vLLM and others sometimes answer {"message": ..., "type": ...} or plain text.
    message = body.get("message") if isinstance(body, dict) else None
    return OpenAIError(str(message or body)[:2000], status=status,
                       type="invalid_request_error" if status < 500 else "server_error")
