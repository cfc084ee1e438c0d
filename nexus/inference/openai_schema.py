"""The /v1 request and response bodies as pydantic models: what the API validates and documents.

Requests are validated through these models (strict types, OpenAI's ranges) and keep every
field the client sent, declared or not (`extra="allow"`): a pass-through backend sends the
body on as it came, and a backend that cannot honour a field refuses it by name
(nexus.inference.capabilities). The response models are the documented contract; the hot
path builds the same shapes as plain dicts (one model per streamed chunk would cost more than
the chunk), and tests validate those dicts against these models so the two cannot drift.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs, and OpenAI's top_logprobs bound

ChatRole = Literal["system", "user", "assistant", "developer", "tool"]
TokenIds = list[int]
_StopString = Annotated[str, Field(min_length=1)]
Stop = _StopString | Annotated[list[_StopString], Field(min_length=1, max_length=MAX_STOP_SEQUENCES)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None


class _Sampling(_Request):
    """The fields both text endpoints share."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: Stop | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Passed through to engines that honour them (see the README's /v1 section for each backend):
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt` is a text, a list of texts, token ids, or a list of those."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class ContentPart(BaseModel):
    """One part of a message's content: text, or (for engines that take them) images and more."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls, tool_call_id…

    role: ChatRole
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class EmbeddingRequest(_Request):
    """POST /v1/embeddings. `input` is a text, a list of texts, token ids, or a list of those."""

    model: str = Field(min_length=1)
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# --- responses -----------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")  # a pass-through engine may add fields of its own


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(_Response):
    """The answer of POST /v1/completions, and each streamed chunk of it (`usage` null but in the last)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Embedding(_Response):
    index: int
    object: Literal["embedding"]
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingList(_Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class OpenAIModel(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None  # as vLLM answers it: the context length, prompt included


class OpenAIModelList(_Response):  # named apart from the catalog's ModelList: one OpenAPI document holds both
    object: Literal["list"]
    data: list[OpenAIModel]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(_Response):
    error: ErrorDetail


FIELD_NAMES = frozenset(name for cls in (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, Message,
                                         ContentPart, StreamOptions) for name in cls.model_fields)
