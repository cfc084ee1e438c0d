"""OpenAI wire shapes: validate request bodies, build responses, stream chunks and errors.

Pure functions over dicts. The /v1 blueprint, the batch runner and the model
server all use these, so every surface answers in the same shape the official
`openai` SDK expects.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nexus.inference.types import (
    ChatMessage,
    Choice,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamDelta,
    Usage,
)

MAX_N = 16
MAX_STOP_SEQUENCES = 4
CHAT_ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
SSE_DONE = "data: [DONE]\n\n"


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat.completions"


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
    request: GenerationRequest
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


# --- request validation -------------------------------------------------------


def parse_completion_body(body: Any) -> ApiCall:
    body = _require_object(body)
    prompt = _parse_prompt(body.get("prompt"))
    params = _parse_sampling(body, default_max_tokens=16)
    return _api_call(Endpoint.COMPLETIONS, body, GenerationRequest(prompt=prompt, params=params))


def parse_chat_body(body: Any) -> ApiCall:
    body = _require_object(body)
    messages = _parse_messages(body.get("messages"))
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    params = _parse_sampling(body, default_max_tokens=None)
    return _api_call(Endpoint.CHAT, body, GenerationRequest(messages=messages, params=params))


def parse_body(endpoint: Endpoint, body: Any) -> ApiCall:
    return parse_chat_body(body) if endpoint is Endpoint.CHAT else parse_completion_body(body)


def _api_call(endpoint: Endpoint, body: dict, request: GenerationRequest) -> ApiCall:
    stream = _optional_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return ApiCall(endpoint, _parse_model(body.get("model")), request, stream, include_usage)


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    return body


def _parse_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("'model' is required and must be a non-empty string", param="model",
                                  code="missing_required_parameter" if model is None else "invalid_type")
    return model


def _parse_prompt(prompt: Any) -> str:
    # OpenAI also accepts a list of prompts or token arrays; we serve one text prompt per request.
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise InvalidRequestError("'prompt' is required", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string (or a list holding one string)",
                                  param="prompt", code="invalid_type")
    return prompt


def _parse_messages(messages: Any) -> tuple[ChatMessage, ...]:
    if messages is None:
        raise InvalidRequestError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages", code="invalid_type")
    return tuple(_parse_message(i, m) for i, m in enumerate(messages))


def _parse_message(index: int, message: Any) -> ChatMessage:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{param} must be an object", param=param, code="invalid_type")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise InvalidRequestError(f"{param}.role must be one of {sorted(CHAT_ROLES)}", param=f"{param}.role")
    return ChatMessage(role=role, content=_message_text(param, message.get("content")))


def _message_text(param: str, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise InvalidRequestError(f"{param}.content must be a string or an array of text parts",
                              param=f"{param}.content", code="invalid_type")


def _parse_sampling(body: dict, default_max_tokens: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=_optional_int(body, "max_tokens", default_max_tokens, minimum=1),
        temperature=_optional_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_optional_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        stop=_parse_stop(body.get("stop")),
        n=_optional_int(body, "n", 1, minimum=1, maximum=MAX_N),
        seed=_optional_int(body, "seed", None),
    )


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise InvalidRequestError("'stop' must be a non-empty string or an array of them", param="stop",
                                  code="invalid_type")
    if len(values) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(values)


def _optional_int(body: dict, name: str, default: int | None, minimum: int | None = None,
                  maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{name}' must be an integer", param=name, code="invalid_type")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InvalidRequestError(f"'{name}' must be between {minimum} and {maximum}, got {value}"
                                  if maximum is not None else f"'{name}' must be at least {minimum}, got {value}",
                                  param=name)
    return value


def _optional_number(body: dict, name: str, default: float, low: float, high: float,
                     low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"'{name}' must be a number", param=name, code="invalid_type")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(f"'{name}' must be in {bracket}{low}, {high}], got {value}", param=name)
    return float(value)


def _optional_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a boolean", param=name, code="invalid_type")
    return value


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
    return {"index": choice.index, "text": choice.text, "logprobs": None,
            "finish_reason": choice.finish_reason.value}


def _chat_choice(choice: Choice) -> dict[str, Any]:
    return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
            "logprobs": None, "finish_reason": choice.finish_reason.value}


def build_chunk(call: ApiCall, response_id: str, created: int, delta: StreamDelta,
                first: bool = False) -> dict[str, Any]:
    """One streamed chunk; `first` marks the first chunk of a chat choice (it carries the role)."""
    finish = delta.finish_reason.value if delta.finish_reason else None
    if call.endpoint is Endpoint.CHAT:
        content: dict[str, str] = {"role": "assistant"} if first else {}
        if delta.text or not first:
            content["content"] = delta.text
        choice = {"index": delta.index, "delta": content, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": delta.index, "text": delta.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": call.model, "choices": [choice]}


def build_usage_chunk(call: ApiCall, response_id: str, created: int, usage: Usage) -> dict[str, Any]:
    obj = "chat.completion.chunk" if call.endpoint is Endpoint.CHAT else "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": call.model, "choices": [],
            "usage": usage.as_dict()}


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def build_models_list(names: list[str], created: int = 0, owned_by: str = "nexus") -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": owned_by} for n in names]}


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
