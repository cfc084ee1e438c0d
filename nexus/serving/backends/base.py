"""The one small interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from nexus.inference.capabilities import PASS_THROUGH, Capabilities
from nexus.inference.openai_shapes import UnsupportedParameterError
from nexus.inference.streams import EventWriter
from nexus.inference.types import (Choice, EmbeddingRequest, EmbeddingResult, FinishReason, GenerationRequest,
                                   GenerationResult, StreamDelta, Usage, merge_logprobs)
from nexus.jobs.failures import FailureKind


class EngineFailed(RuntimeError):
    """The engine failed a step (CUDA, the model, the batch): every request in that step gets this.
    The node's failure, not the request's (nexus.jobs.failures); raised from the engine's own error."""

    failure_kind = FailureKind.INFRASTRUCTURE


class InferenceBackend(ABC):
    """Turns a GenerationRequest into choices. Thread-safe: many requests may be in flight.

    `capabilities` says which request fields the backend honours (nexus.inference.capabilities)."""

    capabilities: Capabilities = PASS_THROUGH

    @abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole answer at once. Raises OpenAIError subclasses for bad requests."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta | Usage]:
        """Text deltas as they are produced (each choice's last one has its finish
        reason), then exactly one Usage."""

    def stream_into(self, request: GenerationRequest, writer: EventWriter,
                    check_cancelled: Callable[[], None]) -> Usage | None:
        """Stream the request's deltas into `writer` and return its usage; `check_cancelled` raises
        to stop. This thread hands each delta on; a backend with its own engine loop in this
        process feeds the writer from that loop instead (transformers)."""
        stream, usage = self.stream(request), None
        try:
            for event in stream:
                if isinstance(event, Usage):
                    usage = event
                elif isinstance(event, StreamDelta):
                    writer.delta(event)
                    check_cancelled()  # the client went away: stop generating
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return usage

    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per input. Backends that serve no embeddings keep this refusal."""
        raise UnsupportedParameterError("this model's backend serves no embeddings", param="model")

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Release the model or the connection; the backend is unusable afterwards."""


def collect_stream(events: Iterator[StreamDelta | Usage]) -> GenerationResult:
    """Assemble a full result from a stream; lets a backend implement generate() once."""
    texts: dict[int, list[str]] = {}
    finishes: dict[int, FinishReason] = {}
    logprobs: dict[int, Mapping[str, Any] | None] = {}
    usage: Usage | None = None
    for event in events:
        if isinstance(event, Usage):
            usage = event
            continue
        texts.setdefault(event.index, []).append(event.text)
        if event.logprobs is not None:
            logprobs[event.index] = merge_logprobs(logprobs.get(event.index), event.logprobs)
        if event.finish_reason is not None:
            finishes[event.index] = event.finish_reason
    if usage is None:
        raise RuntimeError("the stream ended without usage")
    choices = tuple(Choice(i, "".join(texts[i]), finishes[i], logprobs.get(i)) for i in sorted(texts))
    return GenerationResult(choices=choices, usage=usage)
