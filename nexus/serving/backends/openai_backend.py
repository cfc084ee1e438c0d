"""Any OpenAI-compatible server (vLLM, TGI, llama.cpp, another Nexus) as a backend.

Requests go over HTTP with a pooled session, so many may be in flight at once
and the server batches them itself. The client's body is passed on as sent
(every sampling field, logprobs, tools, response_format, prompt lists), and
the server's answer comes back with its logprobs and tool calls. Errors the
server answers keep their status and OpenAI shape, so a client sees the same
400 it would see there.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter

from nexus.serving.backends.base import InferenceBackend
from nexus.inference.capabilities import PASS_THROUGH
from nexus.inference.openai_shapes import BackendError, error_from_body, float32_bytes
from nexus.inference.types import (Choice, EmbeddingRequest, EmbeddingResult, FinishReason, GenerationRequest,
                                   GenerationResult, StreamDelta, Usage)


_FINISH_REASONS = {reason.value: reason for reason in FinishReason}


def finish_reason(value: str | None) -> FinishReason | None:
    """OpenAI servers also answer 'abort' and others of their own; all of them end the choice."""
    if value is None:
        return None
    return _FINISH_REASONS.get(value, FinishReason.STOP)


def request_body(model: str, request: GenerationRequest, stream: bool) -> dict:
    """The client's body as it sent it, addressed to the server's name for the model. A stream always
    asks for usage (the worker counts it); the API shows it only to clients that asked."""
    body = dict(request.body) if request.body else _body_from_params(request)
    body.update(model=model, stream=stream)
    if stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


def _body_from_params(request: GenerationRequest) -> dict:
    """A body for a request built in code rather than received (no client body to pass on)."""
    params = request.params
    body: dict = {"temperature": params.temperature, "top_p": params.top_p, "n": params.n}
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if request.is_chat:
        body["messages"] = [m.as_dict() for m in request.messages]
    else:
        body["prompt"] = request.prompt if isinstance(request.prompt, str) else [
            p if isinstance(p, str) else list(p) for p in request.prompts]
    return body


class OpenAIBackend(InferenceBackend):
    capabilities = PASS_THROUGH  # the body goes on as the client sent it; the server's own 400s come back

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_seconds: float = 600.0,
                 max_connections: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout_seconds
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_connections)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def _post(self, path: str, body: dict, stream: bool = False) -> requests.Response:
        try:
            response = self._session.post(self.base_url + path, json=body, stream=stream, timeout=(10, self.timeout))
        except requests.RequestException as exc:
            raise BackendError(f"the model server at {self.base_url} is unreachable: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise error_from_body(response.status_code, body)
        return response

    def generate(self, request: GenerationRequest) -> GenerationResult:
        body = self._post(self._path(request), request_body(self.model, request, stream=False)).json()
        choices = tuple(
            Choice(int(c.get("index", i)), _choice_text(c, request.is_chat), finish_reason(c.get("finish_reason"))
                   or FinishReason.STOP, c.get("logprobs"), _extra(c.get("message")) if request.is_chat else None)
            for i, c in enumerate(body.get("choices", [])))
        usage = body.get("usage") or {}
        return GenerationResult(tuple(sorted(choices, key=lambda c: c.index)),
                                Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))))

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta | Usage]:
        response = self._post(self._path(request), request_body(self.model, request, stream=True), stream=True)
        usage = Usage(0, 0)
        try:
            for chunk in _sse_chunks(response):
                if chunk.get("usage"):
                    usage = Usage(int(chunk["usage"].get("prompt_tokens", 0)),
                                  int(chunk["usage"].get("completion_tokens", 0)))
                for choice in chunk.get("choices") or ():
                    yield StreamDelta(int(choice.get("index", 0)), _delta_text(choice, request.is_chat),
                                      finish_reason(choice.get("finish_reason")), choice.get("logprobs"),
                                      _extra(choice.get("delta")) if request.is_chat else None)
        finally:
            response.close()
        yield usage

    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The server's embeddings, asked as base64 (a quarter of the bytes of JSON floats)."""
        body = {**request.body, "model": self.model, "encoding_format": "base64"}
        answer = self._post("/embeddings", body).json()
        data = sorted(answer.get("data") or [], key=lambda d: int(d.get("index", 0)))
        vectors = tuple(base64.b64decode(d["embedding"]) if isinstance(d["embedding"], str)
                        else float32_bytes(d["embedding"]) for d in data)  # a server that ignored base64
        return EmbeddingResult(vectors, int((answer.get("usage") or {}).get("prompt_tokens", 0)))

    @staticmethod
    def _path(request: GenerationRequest) -> str:
        return "/chat/completions" if request.is_chat else "/completions"

    def healthy(self) -> bool:
        try:
            return self._session.get(self.base_url + "/models", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self._session.close()


def _extra(message: dict | None) -> dict | None:
    """A chat message's or delta's fields beyond role and content (tool_calls, reasoning_content…)."""
    extra = {k: v for k, v in (message or {}).items() if k not in ("role", "content") and v not in (None, [])}
    return extra or None


def _choice_text(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def _delta_text(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _sse_chunks(response: requests.Response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise error_from_body(500, event)
        yield event
