"""A benchmark's request and its limits: pure validation, a ValueError naming the field."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from nexus.models.catalog import MODEL_NAME_PATTERN

MAX_CELLS = 256  # node x batch size x context length, per benchmark
MAX_BATCH_SIZE = 1024
MAX_CONTEXT_LENGTH = 1_000_000
MAX_OUTPUT_TOKENS = 4096
MAX_REPETITIONS = 10
MAX_NODES = 64
MAX_AXIS = 32  # values per axis (batch sizes, context lengths)


class SweepInvalid(ValueError):
    """A bad benchmark request; `field` names what is wrong (the API's 400 details)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Sweep:
    """What one node measures: every (batch size, context length) pair, `repetitions` times each."""

    model: str
    batch_sizes: tuple[int, ...]
    context_lengths: tuple[int, ...]
    output_tokens: int = 32
    repetitions: int = 1

    @property
    def cells_per_node(self) -> int:
        return len(self.batch_sizes) * len(self.context_lengths)

    def pairs(self) -> list[tuple[int, int]]:
        return [(batch, context) for context in self.context_lengths for batch in self.batch_sizes]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_sizes"], out["context_lengths"] = list(self.batch_sizes), list(self.context_lengths)
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> "Sweep":
        """Checks shapes and ranges (not whether the model or the nodes exist: the API does)."""
        if not isinstance(raw, dict):
            raise SweepInvalid("payload", "a benchmark is a JSON object")
        unknown = set(raw) - {"model", "batch_sizes", "context_lengths", "output_tokens", "repetitions"}
        if unknown:
            raise SweepInvalid(sorted(unknown)[0], f"unknown fields: {sorted(unknown)}")
        model = raw.get("model")
        if not isinstance(model, str) or not re.match(MODEL_NAME_PATTERN, model):
            raise SweepInvalid("model", "model must name a catalog model")
        return cls(model, _axis(raw, "batch_sizes", MAX_BATCH_SIZE), _axis(raw, "context_lengths", MAX_CONTEXT_LENGTH),
                   _bounded(raw, "output_tokens", 32, MAX_OUTPUT_TOKENS), _bounded(raw, "repetitions", 1, MAX_REPETITIONS))


def _axis(raw: dict, name: str, most: int) -> tuple[int, ...]:
    values = raw.get(name)
    if not isinstance(values, list) or not values:
        raise SweepInvalid(name, f"{name} must be a non-empty list of integers")
    if len(values) > MAX_AXIS:
        raise SweepInvalid(name, f"{name} has {len(values)} values; at most {MAX_AXIS}")
    if not all(_is_int(v) and 1 <= v <= most for v in values):
        raise SweepInvalid(name, f"{name} must hold integers between 1 and {most}")
    return tuple(sorted(set(values)))


def _bounded(raw: dict, name: str, default: int, most: int) -> int:
    value = raw.get(name, default)
    if not _is_int(value) or not 1 <= value <= most:
        raise SweepInvalid(name, f"{name} must be an integer between 1 and {most}")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_size(sweep: Sweep, nodes: int) -> None:
    """A sweep is capped in cells: nodes x batch sizes x context lengths."""
    if not 1 <= nodes <= MAX_NODES:
        raise SweepInvalid("nodes", f"a benchmark runs on 1 to {MAX_NODES} nodes, not {nodes}")
    cells = nodes * sweep.cells_per_node
    if cells > MAX_CELLS:
        raise SweepInvalid("batch_sizes", f"{nodes} nodes x {len(sweep.batch_sizes)} batch sizes x "
                                          f"{len(sweep.context_lengths)} context lengths = {cells} cells; "
                                          f"at most {MAX_CELLS}")


def check_model_length(sweep: Sweep, max_model_len: int | None) -> None:
    """The longest prompt plus the output must fit the model's context."""
    if max_model_len is not None and max(sweep.context_lengths) + sweep.output_tokens > max_model_len:
        raise SweepInvalid("context_lengths", f"context length {max(sweep.context_lengths)} + output_tokens "
                                              f"{sweep.output_tokens} exceeds the model's max_model_len "
                                              f"{max_model_len}")
