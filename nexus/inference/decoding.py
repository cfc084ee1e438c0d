"""Per-step decoding decisions: which token comes next, and which text is safe to emit.

`next_tokens` samples a whole batch at once with per-row temperature, top-p
and seeded generators (so a seeded request gives the same answer whatever it
is batched with). `StopTracker` turns the growing decoded text of one choice
into deltas, holding back text that may still become a stop string or an
unfinished UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a character to


class StopTracker:
    """Emits the text of one choice piece by piece and detects stop strings."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.emitted = 0  # characters of the decoded text already handed out

    def advance(self, text: str, final: bool = False) -> tuple[str, bool]:
        """`text` is the full decoded completion so far. Returns (new text, hit_stop).
        On a stop hit the returned text ends just before the stop string."""
        hit = self._first_stop(text)
        if hit is not None:
            return self._take(text, hit), True
        safe = len(text) if final else len(text) - self._holdback(text)
        return self._take(text, safe), False

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = text[self.emitted:end]
        self.emitted = end
        return piece

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.emitted - self._longest)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        trimmed = text.rstrip(REPLACEMENT_CHAR)
        held = len(text) - len(trimmed)
        for size in range(min(self._longest - 1, len(trimmed)), 0, -1):
            suffix = trimmed[-size:]
            if any(s.startswith(suffix) for s in self._stop):
                return held + size
        return held


def next_tokens(logits, temperatures: Sequence[float], top_ps: Sequence[float], generators: Sequence) -> list[int]:
    """One token per row of `logits` [batch, vocab]. Temperature 0 is greedy; a
    row's generator (or None for the global one) makes sampling reproducible."""
    import torch

    tokens = logits.argmax(dim=-1)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        rows = logits[sampled].float()
        temps = torch.tensor([temperatures[i] for i in sampled], dtype=rows.dtype)
        probs = torch.softmax(rows / temps[:, None], dim=-1)
        probs = _top_p_filter(probs, torch.tensor([top_ps[i] for i in sampled], dtype=rows.dtype))
        for row, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    return tokens.tolist()


def _top_p_filter(probs, top_ps):
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    import torch

    if bool((top_ps >= 1.0).all()):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_ps[:, None], 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
