"""Per-step decoding decisions: which token comes next, and which text is safe to emit.

`next_tokens` samples a whole batch at once with per-row temperature, top-p
and seeded generators (so a seeded request gives the same answer whatever it
is batched with). `IncrementalDecoder` keeps the text of one choice's tokens
without decoding them all again at each step, and `StopTracker` turns that
growing text into deltas, holding back text that may still become a stop
string or an unfinished UTF-8 character. `adjust_logits` applies penalties and logit bias,
and `token_logprobs` / `LogprobsBuilder` report what the model thought of each token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a character to


class IncrementalDecoder:
    """The decoded text of one choice's growing token list, at the cost of its newest tokens.

    Decoding the whole list at every step is O(n) per token, O(n^2) per answer: about 9%
    of the CPU engine's time at 256 tokens. This decodes a window that starts a few tokens
    back (the last step's new tokens), so text that depends on the token before it (a
    leading space, a character split over byte tokens) comes out as a full decode gives it;
    while the window ends in half a character it waits for the next token (the scheme of
    vLLM's incremental detokenizer).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._text = ""
        self._prefix = 0  # where the decoded window starts
        self._read = 0  # tokens whose text is in self._text

    def text(self, ids: list[int], final: bool = False) -> str:
        """The text of `ids` (the same list, grown since the last call); `final` lets half a character out."""
        prefix_text = self._decode(ids[self._prefix:self._read])
        window_text = self._decode(ids[self._prefix:])
        new = window_text[len(prefix_text):]
        if final:
            return self._text + new
        if new and not new.endswith(REPLACEMENT_CHAR):
            self._text += new
            self._prefix, self._read = self._read, len(ids)
        return self._text


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


def adjust_logits(logits, params: Sequence, generated: Sequence[Sequence[int]]):
    """A copy of `logits` with each row's penalties and logit bias applied (rows whose params are None
    stay as they are). Presence and frequency penalties count the row's generated tokens, as OpenAI
    and vLLM define them; a bias is added to its token's logit."""
    import torch

    with torch.inference_mode():
        out = logits.float().clone()
        vocab = out.shape[-1]
        for i, p in enumerate(params):
            if p is None:
                continue
            if (p.presence_penalty or p.frequency_penalty) and generated[i]:
                counts = torch.bincount(torch.tensor(generated[i], device=out.device), minlength=vocab)[:vocab]
                out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            for token, bias in p.logit_bias:
                if 0 <= token < vocab:
                    out[i, token] += bias
    return out


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at that step, most likely first


def token_logprobs(logits, chosen: Sequence[int], top: int) -> list[TokenLogprob]:
    """Log-softmax of each row: the chosen token's logprob and the `top` most likely alternatives."""
    import torch

    with torch.inference_mode():
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0].tolist()
        if top:
            values, ids = logprobs.topk(top, dim=-1)
            alternatives = [tuple(zip(r_ids, r_values)) for r_ids, r_values in zip(ids.tolist(), values.tolist())]
        else:
            alternatives = [()] * len(chosen)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(chosen, picked, alternatives)]


class LogprobsBuilder:
    """One choice's token logprobs, handed out in OpenAI's wire shape with the text they produced.

    Tokens accumulate until the text they make is emitted (a stop string or half a character may
    hold text back); `take` returns the logprobs object for the tokens since the last call."""

    def __init__(self, token_text: Callable[[int], str], top: int, chat: bool) -> None:
        self._text, self._top, self._chat = token_text, top, chat
        self._pending: list[TokenLogprob] = []
        self._offset = 0  # characters of the completion before the pending tokens

    def add(self, entry: TokenLogprob) -> None:
        self._pending.append(entry)

    def take(self) -> dict | None:
        entries, self._pending = self._pending, []
        if not entries:
            return None
        return self._chat_shape(entries) if self._chat else self._completion_shape(entries)

    def _chat_shape(self, entries: list[TokenLogprob]) -> dict:
        def one(token: int, logprob: float) -> dict:
            text = self._text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**one(e.token, e.logprob),
                             "top_logprobs": [one(t, lp) for t, lp in e.top[:self._top]]} for e in entries]}

    def _completion_shape(self, entries: list[TokenLogprob]) -> dict:
        tokens = [self._text(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._text(t): lp for t, lp in e.top[:self._top]} for e in entries],
                "text_offset": offsets}
