"""The values every inference backend speaks: a request in, choices and usage out.

Backends never see HTTP bodies and the API never sees tensors; these small
frozen dataclasses are the whole contract between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping


class FinishReason(str, Enum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the model's context was reached
    TOOL_CALLS = "tool_calls"  # a pass-through engine answered with tool calls
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: as many as the model's context leaves
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives per token; None: no logprobs at all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Prompt = str | tuple[int, ...]  # a text, or token ids


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `prompt` (raw completion) or `messages` (chat) is set.

    `prompt` is one text, or a tuple of prompts (texts or token-id tuples) as a client may send a
    list; choice `i * n + j` answers prompt `i`. `body` is the client's request as it sent it:
    backends that pass requests through to an engine send it on, field for field."""

    prompt: str | tuple[Prompt, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    body: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a generation request needs exactly one of prompt or messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        """Each prompt of a completion request (one for a text prompt)."""
        if self.prompt is None:
            return ()
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    def fields(self) -> set[str]:
        """The body's fields the client gave a value (null is the same as leaving a field out)."""
        return {name for name, value in self.body.items() if value is not None}


@dataclass(frozen=True)
class Choice:
    """`logprobs` is the choice's logprobs object in the endpoint's wire shape; `extra` holds more
    fields of a chat message (tool_calls, reasoning_content…) a pass-through engine answered."""

    index: int
    text: str
    finish_reason: FinishReason
    logprobs: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # summed over all n choices, as OpenAI counts it

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class GenerationResult:
    choices: tuple[Choice, ...]
    usage: Usage


@dataclass(frozen=True)
class StreamDelta:
    """New text for one choice; the last delta of a choice carries its finish reason.
    A stream yields deltas and ends with one Usage."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: Mapping[str, Any] | None = None  # the new tokens' logprobs, in the endpoint's wire shape
    extra: Mapping[str, Any] | None = None  # more delta fields (tool_calls…): such a delta is never merged


def merge_logprobs(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """Two consecutive logprobs objects of one choice as one: their per-token lists joined
    (chat's `content`, or completions' `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""
    if before is None or after is None:
        return before if after is None else after
    return {key: [*(before.get(key) or ()), *(after.get(key) or ())] for key in {*before, *after}}


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs to embed (texts or token-id tuples); `body` as the client sent it."""

    inputs: tuple[Prompt, ...]
    body: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def fields(self) -> set[str]:
        return {name for name, value in self.body.items() if value is not None}


@dataclass(frozen=True)
class EmbeddingResult:
    """One vector per input, in order, as little-endian float32 bytes (what `base64` encodes)."""

    vectors: tuple[bytes, ...]
    prompt_tokens: int
