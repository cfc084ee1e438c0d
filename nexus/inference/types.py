"""The values every inference backend speaks: a request in, choices and usage out.

Backends never see HTTP bodies and the API never sees tensors; these small
frozen dataclasses are the whole contract between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the model's context was reached


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: as many as the model's context leaves
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `prompt` (raw completion) or `messages` (chat) is set."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a generation request needs exactly one of prompt or messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: FinishReason


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
