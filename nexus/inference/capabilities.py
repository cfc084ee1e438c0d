"""What a backend does with a /v1 request's fields: pass them to its engine, or honour a known set.

Every backend declares one `Capabilities`. A pass-through backend (vLLM, any OpenAI-compatible
server) sends the body on as the client sent it, so the engine judges each field and its own
400 reaches the client. A backend that implements the API itself (transformers on CPU) lists
the fields it honours and refuses any other with 400 `unsupported_parameter` naming it: nothing
is silently ignored. The API checks before it queues a request; the backend checks again, for
requests that come another way (batch files).
"""

from __future__ import annotations

from dataclasses import dataclass

from nexus.inference.openai_shapes import Endpoint, UnsupportedParameterError
from nexus.inference.types import EmbeddingRequest, GenerationRequest

_SAMPLING = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
                       "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                       "user"})  # an end-user id for the caller's own records: it changes no output
_MESSAGE_FIELDS = frozenset({"role", "content"})


@dataclass(frozen=True)
class Capabilities:
    backend: str
    passthrough: bool = False  # the engine receives the body as sent and judges every field
    fields: dict[Endpoint, frozenset[str]] | None = None  # what a non-pass-through backend honours
    prompt_lists: bool = True  # several prompts, or token ids, in one completion request
    text_only_messages: bool = False  # message content must be text (no images, no tool calls)

    def check(self, request: GenerationRequest | EmbeddingRequest) -> None:
        """Raise UnsupportedParameterError naming the first field this backend cannot honour."""
        if self.passthrough:
            return
        model = str(request.body.get("model", ""))
        endpoint = _endpoint_of(request)
        supported = (self.fields or {}).get(endpoint)
        if supported is None:
            raise UnsupportedParameterError(f"model '{model}' (backend {self.backend}) does not serve "
                                            f"/v1/{endpoint.value.replace('.', '/')}", param="model")
        for name in sorted(request.fields() - supported):
            raise UnsupportedParameterError(
                f"'{name}' is not supported by model '{model}' (backend {self.backend}); it honours "
                f"{', '.join(sorted(supported))}", param=name)
        if isinstance(request, GenerationRequest):
            self._check_shapes(model, request)

    def _check_shapes(self, model: str, request: GenerationRequest) -> None:
        if not self.prompt_lists and request.prompt is not None and not isinstance(request.prompt, str):
            raise UnsupportedParameterError(f"model '{model}' (backend {self.backend}) takes one text prompt",
                                            param="prompt")
        if self.text_only_messages:
            for i, message in enumerate(request.body.get("messages") or ()):
                extra = sorted(set(message) - _MESSAGE_FIELDS)
                if extra:
                    raise UnsupportedParameterError(
                        f"messages[{i}].{extra[0]} is not supported by model '{model}' (backend {self.backend})",
                        param=f"messages[{i}].{extra[0]}")
                content = message.get("content")
                if isinstance(content, list) and any(part.get("type") != "text" for part in content):
                    raise UnsupportedParameterError(
                        f"model '{model}' (backend {self.backend}) takes text content parts only",
                        param=f"messages[{i}].content")


def _endpoint_of(request: GenerationRequest | EmbeddingRequest) -> Endpoint:
    if isinstance(request, EmbeddingRequest):
        return Endpoint.EMBEDDINGS
    return Endpoint.CHAT if request.is_chat else Endpoint.COMPLETIONS


PASS_THROUGH = Capabilities("openai", passthrough=True)

IN_PROCESS = Capabilities(
    "transformers",
    fields={
        Endpoint.COMPLETIONS: _SAMPLING | {"prompt"},
        Endpoint.CHAT: _SAMPLING | {"messages", "max_completion_tokens", "top_logprobs"},
        Endpoint.EMBEDDINGS: frozenset({"model", "input", "encoding_format", "user"}),
    },
    text_only_messages=True,
)
