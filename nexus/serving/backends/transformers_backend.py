"""CPU (or single-GPU) inference in this process with transformers.

The model is loaded once per worker process (the serving worker builds the
backend before its pool starts) and driven by one engine thread that batches
continuously: the choices of concurrent requests are decoded together, one
forward pass per step with a KV cache, each row with its own sampling
parameters, stop strings and seeded generator; new rows join between steps
and finished ones leave at once (nexus.serving.kv_batch). Callers only
tokenize and wait on a queue of deltas.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nexus.serving.backends.base import EngineFailed, InferenceBackend, collect_stream
from nexus.serving.decoding import (IncrementalDecoder, LogprobsBuilder, StopTracker, adjust_logits, next_tokens,
                                    token_logprobs)
from nexus.serving.kv_batch import RunningBatch, mergeable
from nexus.inference.capabilities import IN_PROCESS
from nexus.inference.openai_shapes import ContextLengthExceededError, InvalidRequestError, float32_bytes
from nexus.inference.streams import EventWriter, StepFlusher
from nexus.inference.types import (EmbeddingRequest, EmbeddingResult, FinishReason, GenerationRequest,
                                   GenerationResult, SamplingParams, StreamDelta, Usage)

_ROW_DONE = object()
_CLOSE = object()
CANCEL_CHECK_SECONDS = 0.25  # how often a request thread that waits on the engine checks for a cancel


@dataclass(eq=False)
class _Row:
    """One choice being decoded; its events go to the request's queue."""

    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: object  # torch.Generator or None
    events: queue.Queue
    cancelled: threading.Event
    decoder: IncrementalDecoder
    logprobs: LogprobsBuilder | None = None  # set when the request asked for logprobs
    generated: list[int] = field(default_factory=list)
    tracker: StopTracker = field(init=False)
    finished: bool = False
    next_input: int = 0  # the token fed at the next step
    streaming: bool = True  # False: one event at the end, not a wake-up of the waiting thread per token
    held: list[str] = field(default_factory=list)  # text not handed out yet when not streaming
    # The request's EventWriter, fed by the engine itself (stream_into): no wake-up of the request's
    # thread per token, and the engine loop writes between steps (nexus.inference.streams.StepFlusher).
    sink: Callable[[StreamDelta], None] | None = None

    def __post_init__(self) -> None:
        self.tracker = StopTracker(self.params.stop)

    @property
    def adjusts_logits(self) -> bool:
        p = self.params
        return bool(p.presence_penalty or p.frequency_penalty or p.logit_bias)

    def emit(self, text: str) -> None:
        if self.sink is not None:
            self.sink(StreamDelta(self.index, text, logprobs=self.logprobs.take() if self.logprobs else None))
        elif self.streaming:
            self.events.put(StreamDelta(self.index, text, logprobs=self.logprobs.take() if self.logprobs else None))
        else:
            self.held.append(text)

    def fail(self, error: BaseException) -> None:
        self.finished = True
        self.events.put(error)

    def finish(self, text: str, reason: FinishReason) -> None:
        self.finished = True
        delta = StreamDelta(self.index, "".join(self.held) + text, reason,
                            logprobs=self.logprobs.take() if self.logprobs else None)
        if self.sink is not None:
            self.sink(delta)
        else:
            self.events.put(delta)
        self.events.put((_ROW_DONE, len(self.generated)))


class TransformersBackend(InferenceBackend):
    capabilities = IN_PROCESS

    def __init__(self, model_path: str | Path, device: str = "cpu", max_batch_size: int = 8,
                 batch_window_ms: float = 2.0, torch_threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model_path = str(model_path)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._tokenizer_lock = threading.Lock()  # the Rust tokenizer is not safe for concurrent use
        self._model = AutoModelForCausalLM.from_pretrained(self.model_path).to(device).eval()
        self._device = device
        self.max_model_len = int(self._model.config.max_position_embeddings)
        self._eos_ids = _eos_ids(self._model, self._tokenizer)
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._eos_ids[0]
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._max_batch = max_batch_size
        self._window = batch_window_ms / 1000.0  # an idle engine waits this long for company
        self._incoming: queue.Queue = queue.Queue()
        self._closing = False
        self._mergeable = True  # until a model's cache says otherwise
        self._token_texts: dict[int, str] = {}  # each token's own text, for logprobs
        self._writes = StepFlusher()  # the stream writes of stream_into's requests, between steps
        self._engine = threading.Thread(target=self._engine_loop, name="nexus-transformers", daemon=True)
        self._engine.start()

    # --- the interface ----------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return collect_stream(self.stream(request, streaming=False))

    def stream(self, request: GenerationRequest, streaming: bool = True) -> Iterator[StreamDelta | Usage]:
        rows, prompt_tokens = self._submit(request, streaming)
        return self._events(rows, prompt_tokens)

    def stream_into(self, request: GenerationRequest, writer: EventWriter,
                    check_cancelled: Callable[[], None]) -> Usage:
        """The engine buffers the text into `writer` itself and writes it between its steps; this
        thread only waits for the rows to finish (checking for a cancel meanwhile)."""
        rows, prompt_tokens = self._submit(request, True, sink=lambda delta: self._writes.add(writer, delta))
        events, pending, completion_tokens = rows[0].events, len(rows), 0
        try:
            while pending:
                try:
                    event = events.get(timeout=CANCEL_CHECK_SECONDS)
                except queue.Empty:
                    check_cancelled()
                    continue
                if isinstance(event, BaseException):
                    raise event
                pending -= 1  # only a row's end comes through the queue
                completion_tokens += event[1]
            return Usage(prompt_tokens, completion_tokens)
        finally:
            rows[0].cancelled.set()  # a request that stops waiting frees its rows at the next step

    def _submit(self, request: GenerationRequest, streaming: bool, sink=None) -> tuple[list[_Row], int]:
        self.capabilities.check(request)
        prompts = self._encode(request)
        rows = self._rows(request, prompts, streaming, sink)
        if self._closing:
            raise RuntimeError("the backend is closed")
        for row in rows:
            self._incoming.put(row)
        return rows, sum(len(ids) for ids in prompts)

    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Mean-pooled, L2-normalised last hidden states, one forward pass for all inputs.

        On the calling thread, beside the engine's: a forward pass without a cache changes no
        state of the model, so the two need no lock."""
        import torch

        self.capabilities.check(request)
        inputs = [self._input_ids(i, value) for i, value in enumerate(request.inputs)]
        with torch.inference_mode():
            ids, mask = self._left_pad(inputs)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                              output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            vectors = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return EmbeddingResult(tuple(float32_bytes(v.tolist()) for v in vectors), sum(len(i) for i in inputs))

    def close(self, timeout: float = 10.0) -> None:
        """Finish the rows being decoded, fail those still waiting, stop the engine."""
        self._closing = True
        self._incoming.put(_CLOSE)
        self._engine.join(timeout)

    # --- request side -----------------------------------------------------------

    def _encode(self, request: GenerationRequest) -> list[list[int]]:
        """Token ids of each prompt (a chat is one prompt)."""
        if request.is_chat:
            with self._tokenizer_lock:
                text = self._tokenizer.apply_chat_template([m.as_dict() for m in request.messages],
                                                           add_generation_prompt=True, tokenize=False)
                return [list(self._tokenizer(text, add_special_tokens=False).input_ids)]
        return [self._input_ids(i, prompt, "prompt") for i, prompt in enumerate(request.prompts)]

    def _input_ids(self, index: int, value: str | tuple[int, ...], param: str = "input") -> list[int]:
        if isinstance(value, str):
            with self._tokenizer_lock:
                ids = list(self._tokenizer(value).input_ids)
        else:
            ids = list(value)
            vocab = int(self._model.config.vocab_size)
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"{param}[{index}] holds token ids outside the vocabulary (0..{vocab - 1})",
                                          param=param)
        if not ids:
            raise InvalidRequestError(f"{param}[{index}] is empty", param=param)
        if len(ids) > self.max_model_len:
            raise ContextLengthExceededError(f"This model's maximum context length is {self.max_model_len} tokens; "
                                             f"{param}[{index}] has {len(ids)}", param=param)
        return ids

    def _rows(self, request: GenerationRequest, prompts: list[list[int]], streaming: bool,
              sink: Callable[[StreamDelta], None] | None = None) -> list[_Row]:
        import torch

        params = request.params
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        rows = []
        for p, prompt_ids in enumerate(prompts):
            max_new = self._max_new_tokens(len(prompt_ids), params.max_tokens)
            for j in range(params.n):
                index = p * params.n + j  # OpenAI's numbering for n choices of each prompt
                generator = None
                if params.seed is not None:
                    generator = torch.Generator().manual_seed(params.seed + j)
                logprobs = None
                if params.logprobs is not None:
                    logprobs = LogprobsBuilder(self._token_text, params.logprobs, chat=request.is_chat)
                rows.append(_Row(index, prompt_ids, max_new, params, generator, events, cancelled,
                                 IncrementalDecoder(self._decode), logprobs, streaming=streaming, sink=sink))
        return rows

    def _max_new_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        room = self.max_model_len - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens")
        return max_tokens if max_tokens is not None else room

    def _events(self, rows: list[_Row], prompt_tokens: int) -> Iterator[StreamDelta | Usage]:
        events = rows[0].events
        pending, completion_tokens = len(rows), 0
        try:
            while pending:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, tuple) and event[0] is _ROW_DONE:
                    pending -= 1
                    completion_tokens += event[1]
                    continue
                yield event
            yield Usage(prompt_tokens, completion_tokens)
        finally:
            rows[0].cancelled.set()  # a consumer that stops reading frees its rows at the next step

    # --- engine thread ----------------------------------------------------------

    def _engine_loop(self) -> None:
        batch, running = RunningBatch(), []
        while True:
            room = self._max_batch - len(running) if (self._mergeable or not running) else 0
            joining = self._take(room, wait=not running)
            try:
                if joining:
                    running = self._admit(batch, running, joining)
                    self._writes.after_step()  # the joining rows' first text, before the next step
                if running:
                    running = self._step(batch, running)
                    self._writes.after_step()
            except BaseException as error:  # the engine must survive any step; each waiter gets the error
                failed = EngineFailed(f"the engine failed a step: {type(error).__name__}: {error}")
                failed.__cause__ = error
                for row in [*running, *joining]:
                    if not row.finished:
                        row.fail(failed)
                batch, running = RunningBatch(), []
            if self._closing and not running:
                self._fail_waiting()
                return

    def _take(self, room: int, wait: bool) -> list[_Row]:
        """Rows to admit: up to `room`; an idle engine blocks for the first, then gathers a window's worth."""
        rows: list[_Row] = []
        if room <= 0 or (self._closing and not wait):
            return rows
        deadline = time.monotonic() + (self._window if wait else 0.0)
        while len(rows) < room:
            try:
                if wait and not rows:
                    item = self._incoming.get()
                else:
                    remaining = deadline - time.monotonic()
                    item = self._incoming.get(timeout=remaining) if remaining > 0 else self._incoming.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSE:
                break
            if not item.cancelled.is_set():
                rows.append(item)
        return rows

    def _admit(self, batch: RunningBatch, running: list[_Row], joining: list[_Row]) -> list[_Row]:
        """Prefill the joining rows' prompts, sample their first tokens, stack them onto the batch."""
        import torch

        with torch.inference_mode():
            input_ids, mask = self._left_pad([row.prompt_ids for row in joining])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        self._mergeable = self._mergeable and mergeable(out.past_key_values)
        self._sample_and_advance(joining, out.logits[:, -1, :])
        batch.add(out.past_key_values, mask, positions[:, -1:])
        return self._prune(batch, [*running, *joining])

    def _step(self, batch: RunningBatch, running: list[_Row]) -> list[_Row]:
        import torch

        with torch.inference_mode():
            feed = torch.tensor([[self._pad_id if row.finished else row.next_input] for row in running],
                                device=self._device)
            mask, positions = batch.next_step()
            out = self._model(input_ids=feed, attention_mask=mask, position_ids=positions,
                              past_key_values=batch.cache, use_cache=True)
        self._sample_and_advance(running, out.logits[:, -1, :])
        return self._prune(batch, running)

    def _sample_and_advance(self, rows: list[_Row], logits) -> None:
        raw = logits
        if any(r.adjusts_logits for r in rows):
            logits = adjust_logits(logits, [r.params if r.adjusts_logits else None for r in rows],
                                   [r.generated for r in rows])
        tokens = next_tokens(logits, [r.params.temperature for r in rows], [r.params.top_p for r in rows],
                             [r.generator for r in rows])
        if any(r.logprobs is not None for r in rows):
            self._record_logprobs(rows, raw, tokens)
        self._advance_rows(rows, tokens)
        for row, token in zip(rows, tokens):
            row.next_input = token

    def _prune(self, batch: RunningBatch, rows: list[_Row]) -> list[_Row]:
        """Drop finished rows (all at once when the cache cannot be cut row by row)."""
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if len(keep) == len(rows):
            return rows
        if self._mergeable or not keep:
            batch.keep(keep)
            return [rows[i] for i in keep]
        return rows

    def _record_logprobs(self, rows: list[_Row], logits, tokens: list[int]) -> None:
        """The chosen tokens' logprobs (of the model's raw distribution, as vLLM reports them)."""
        wanted = [i for i, r in enumerate(rows) if r.logprobs is not None and not r.finished
                  and tokens[i] not in self._eos_ids]
        if not wanted:
            return
        top = max(rows[i].params.logprobs or 0 for i in wanted)
        for i, entry in zip(wanted, token_logprobs(logits[wanted], [tokens[i] for i in wanted], top)):
            rows[i].logprobs.add(entry)  # type: ignore[union-attr]

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self._decode([token])
        return text

    def _fail_waiting(self) -> None:
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if item is not _CLOSE:
                item.fail(RuntimeError("the backend was closed"))

    def _left_pad(self, sequences: list[list[int]]):
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        return ids.to(self._device), mask.to(self._device)

    def _advance_rows(self, rows: list[_Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            if row.finished:
                continue
            if row.cancelled.is_set():
                row.finished = True
                continue
            row.generated.append(token)
            self._advance_row(row, token)

    def _advance_row(self, row: _Row, token: int) -> None:
        if token in self._eos_ids:
            text = row.decoder.text(row.generated[:-1], final=True)
            row.finish(row.tracker.advance(text, final=True)[0], FinishReason.STOP)
            return
        last = len(row.generated) >= row.max_new_tokens  # the final text lets a trailing half character out
        piece, hit_stop = row.tracker.advance(row.decoder.text(row.generated, final=last), final=last)
        if hit_stop:
            row.finish(piece, FinishReason.STOP)
        elif last:
            row.finish(piece, FinishReason.LENGTH)
        elif piece:
            row.emit(piece)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return frozenset(int(i) for i in ids if i is not None)
