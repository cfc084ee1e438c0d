"""One measured cell (node x batch size x context length) and the table of them: pure values."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class Cell:
    """What one node measured at one batch size and prompt length.

    `batch_size` requests run at once, `repetitions` times. Output tok/s is every completion
    token over the wall time of the batches; TTFT is from sending a request to its first text;
    inter-token latency is each request's (last text - first text) / (tokens - 1). Peak memory is
    the most VRAM in use on the worker's GPUs while the cell ran, or the worker's resident memory
    on a CPU node. `errors` counts requests that failed (`error` keeps the first message).
    """

    node: str
    batch_size: int
    context_length: int  # asked for
    prompt_tokens: int  # what the model counted
    requests: int
    output_tokens: int  # completion tokens, all requests
    output_tok_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    peak_memory_mb: float | None
    memory_kind: str  # "vram" or "rss"
    errors: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Cell":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.node, self.batch_size, self.context_length)


def failed_cell(node: str, batch_size: int, context_length: int, error: str) -> Cell:
    """A cell that could not be measured (its node's job failed or was never run)."""
    return Cell(node, batch_size, context_length, 0, 0, 0, 0.0, None, None, None, None, "rss", errors=1,
                error=error[:500])


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


CSV_COLUMNS = tuple(f.name for f in fields(Cell))


def to_csv(cells: Iterable[Cell]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        writer.writerow({k: "" if v is None else v for k, v in cell.to_dict().items()})
    return out.getvalue()


def best_per_node(cells: Iterable[Cell]) -> dict[str, Cell]:
    """Each node's fastest cell without errors: its measured capacity for the model."""
    best: dict[str, Cell] = {}
    for cell in cells:
        if cell.errors or cell.output_tok_s <= 0:
            continue
        if cell.node not in best or cell.output_tok_s > best[cell.node].output_tok_s:
            best[cell.node] = cell
    return best
