"""Worker side: drive one backend through a node's cells and measure each.

Every request streams, so the first text's arrival (TTFT) and the last one's are seen;
a cell sends `batch_size` requests at once from threads (the backend batches them, as
vLLM and the transformers engine both do) and repeats that `repetitions` times.
Prompts are sized in the model's own tokens: a prompt of words is measured once with
the backend's usage count and scaled until it is within a few tokens of the target.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from nexus.benchmarks.cells import Cell, percentile
from nexus.inference.types import GenerationRequest, SamplingParams, StreamDelta, Usage
from nexus.serving.backends.base import InferenceBackend

PROMPT_WORD = " the"
CALIBRATION_ROUNDS = 4
MEMORY_SAMPLE_SECONDS = 0.05


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float | None
    itl_s: float | None
    completion_tokens: int
    error: str | None = None


def sized_prompt(backend: InferenceBackend, target_tokens: int) -> tuple[str, int]:
    """A prompt of about `target_tokens` tokens and the count the model gives it."""
    words, counted = target_tokens, 0
    for _ in range(CALIBRATION_ROUNDS):
        counted = _prompt_tokens(backend, PROMPT_WORD * words)
        if abs(counted - target_tokens) <= 1 or counted == 0:
            break
        words = max(1, round(words * target_tokens / counted))
    while counted > target_tokens and words > 1:  # never longer than asked: the context was checked for it
        words -= 1
        counted = _prompt_tokens(backend, PROMPT_WORD * words)
    return PROMPT_WORD * words, counted


def _prompt_tokens(backend: InferenceBackend, prompt: str) -> int:
    result = backend.generate(GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=1)))
    return result.usage.prompt_tokens


def timed_request(backend: InferenceBackend, prompt: str, output_tokens: int, seed: int) -> RequestTiming:
    request = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=output_tokens, temperature=1.0,
                                                                     seed=seed))
    started = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        stream = backend.stream(request)
        try:
            for event in stream:
                if isinstance(event, StreamDelta) and event.text:
                    last = time.perf_counter()
                    first = first or last
                elif isinstance(event, Usage):
                    tokens = event.completion_tokens
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    except Exception as exc:  # one failed request is the cell's error count, not the benchmark's end
        return RequestTiming(None, None, 0, f"{type(exc).__name__}: {exc}")
    ttft = None if first is None else first - started
    itl = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
    return RequestTiming(ttft, itl, tokens)


def measure_cell(backend: InferenceBackend, node: str, batch_size: int, context_length: int, prompt: str,
                 prompt_tokens: int, output_tokens: int, repetitions: int, memory: "PeakMemory",
                 should_stop: Callable[[], None] = lambda: None) -> Cell:
    timings: list[RequestTiming] = []
    wall = 0.0
    memory.reset()
    with ThreadPoolExecutor(max_workers=batch_size) as pool:
        for repetition in range(repetitions):
            should_stop()
            started = time.perf_counter()
            seeds = range(repetition * batch_size, (repetition + 1) * batch_size)
            timings += list(pool.map(lambda seed: timed_request(backend, prompt, output_tokens, seed), seeds))
            wall += time.perf_counter() - started
    peak_mb, kind = memory.peak()
    ttfts = [t.ttft_s * 1000 for t in timings if t.ttft_s is not None]
    itls = [t.itl_s * 1000 for t in timings if t.itl_s is not None]
    errors = [t.error for t in timings if t.error]
    total_tokens = sum(t.completion_tokens for t in timings)
    return Cell(node, batch_size, context_length, prompt_tokens, len(timings), total_tokens,
                round(total_tokens / wall, 3) if wall > 0 else 0.0, _ms(percentile(ttfts, 50)),
                _ms(percentile(ttfts, 99)), _ms(percentile(itls, 50)), peak_mb, kind, len(errors),
                errors[0][:500] if errors else None)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class PeakMemory:
    """The most memory in use while a cell runs: VRAM of this worker's GPUs when NVML sees any,
    else the resident memory of this process and its children (a model server subprocess)."""

    def __init__(self) -> None:
        self._gpus = _visible_gpu_handles()
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    @property
    def kind(self) -> str:
        return "vram" if self._gpus else "rss"

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def reset(self) -> None:
        with self._lock:
            self._peak = self._sample()

    def peak(self) -> tuple[float, str]:
        with self._lock:
            self._peak = max(self._peak, self._sample())
            return round(self._peak, 1), self.kind

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_SECONDS):
            value = self._sample()
            with self._lock:
                self._peak = max(self._peak, value)

    def _sample(self) -> float:
        if self._gpus:
            import pynvml

            return sum(pynvml.nvmlDeviceGetMemoryInfo(handle).used for handle in self._gpus) / 2**20
        import psutil

        process = psutil.Process()
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20


def _visible_gpu_handles() -> list:
    """NVML handles of the GPUs this worker was given (CUDA_VISIBLE_DEVICES holds NVML indexes:
    the agent sets PCI bus order), or none on a CPU worker or without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    indexes = [int(i) for i in visible.split(",") if i.strip().isdigit()]
    if not indexes:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indexes]
    except Exception:  # no driver here: memory is the process's own
        return []
