"""The transformers backend on the tiny model, in this process: batching, sampling, stops, limits.

The tiny model is real (Llama architecture, saved and loaded with from_pretrained);
only its weights are random, so the tests compare behaviours, not wording.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from nexus.serving.backends.base import collect_stream
from nexus.inference.openai_shapes import ContextLengthExceededError
from nexus.inference.types import ChatMessage, FinishReason, GenerationRequest, SamplingParams, StreamDelta, Usage

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["Hello", "The cluster", "A job is a row", "Numbers: 1 2 3", "def add(a, b):", "Streaming sends",
           "Queues carry routing", "The quick brown fox"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nexus.serving.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def backend(tiny_dir):
    from nexus.serving.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_dir, max_batch_size=8, batch_window_ms=20)
    yield backend
    backend.close()


def greedy(prompt: str, max_tokens: int = 12, **params) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0, **params))


def test_the_tiny_model_is_a_standard_hugging_face_folder(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "im_start" in json.loads((tiny_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_concurrent_requests_are_batched_and_answer_as_if_alone(backend):
    alone = [backend.generate(greedy(p)).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = [r.choices[0].text for r in pool.map(lambda p: backend.generate(greedy(p)), PROMPTS)]
    assert together == alone
    assert sum(1 for text in alone if text) >= len(PROMPTS) // 2  # random weights: a few may stop at once


def test_a_seed_fixes_sampling_whatever_the_batch(backend):
    request = GenerationRequest(prompt="Hello", params=SamplingParams(max_tokens=10, temperature=1.0, seed=42))
    first = backend.generate(request).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        others = list(pool.map(lambda _: backend.generate(request).choices[0].text, range(4)))
    assert others == [first] * 4


def test_n_choices_and_usage(backend):
    result = backend.generate(GenerationRequest(prompt="Hello", params=SamplingParams(max_tokens=5, n=3, seed=1)))
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(c.finish_reason is FinishReason.LENGTH for c in result.choices)
    assert result.usage.completion_tokens == 15 and result.usage.prompt_tokens >= 1


def test_stop_strings_cut_the_answer(backend):
    full = backend.generate(greedy("The quick brown fox", 20)).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = backend.generate(greedy("The quick brown fox", 20, stop=(stop,))).choices[0]
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full[:full.index(stop)]


def test_streamed_deltas_add_up_to_the_answer(backend):
    events = list(backend.stream(greedy("A job is a row", 16)))
    deltas = [e for e in events if isinstance(e, StreamDelta)]
    assert isinstance(events[-1], Usage) and deltas[-1].finish_reason is FinishReason.LENGTH
    assert "".join(d.text for d in deltas) == backend.generate(greedy("A job is a row", 16)).choices[0].text
    assert collect_stream(iter(events)).usage == events[-1]


def test_chat_uses_the_chat_template(backend):
    result = backend.generate(GenerationRequest(messages=(ChatMessage("user", "hi"),),
                                                params=SamplingParams(max_tokens=4, temperature=0)))
    assert result.usage.prompt_tokens > 5  # the template's role markers are in the prompt


def test_more_than_the_context_is_refused(backend):
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 512"):
        backend.generate(greedy("Hello", 600))
    with pytest.raises(ContextLengthExceededError):
        backend.generate(greedy("word " * 600, 1))


def test_requests_join_a_running_batch_and_still_answer_as_if_alone(backend):
    long_request = greedy("The cluster", 48)
    alone_long = backend.generate(long_request).choices[0].text
    alone = [backend.generate(greedy(p, 8)).choices[0].text for p in PROMPTS[:4]]
    events = backend.stream(long_request)
    first = next(e for e in events if isinstance(e, StreamDelta))  # the long one is decoding now
    with ThreadPoolExecutor(4) as pool:
        joined = [r.choices[0].text for r in pool.map(lambda p: backend.generate(greedy(p, 8)), PROMPTS[:4])]
    rest = [e.text for e in events if isinstance(e, StreamDelta)]
    assert joined == alone
    assert first.text + "".join(rest) == alone_long


def test_closing_fails_what_waits_and_refuses_more(tiny_dir):
    from nexus.serving.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_dir, max_batch_size=1)
    running = backend.stream(greedy("Hello", 64))
    waiting = backend.stream(greedy("Hello", 8))
    next(e for e in running if isinstance(e, StreamDelta))
    backend.close()
    assert isinstance(list(running)[-1], Usage)  # the running request finished
    with pytest.raises(RuntimeError, match="closed"):
        list(waiting)
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(greedy("Hello"))


def test_incremental_decoding_gives_the_full_decode_at_every_step(tiny_dir):
    """Random token streams and real multi-byte text (characters split over byte tokens): the
    text after each token is the full decode, less only a trailing half character."""
    import random

    from transformers import AutoTokenizer

    from nexus.serving.decoding import REPLACEMENT_CHAR, IncrementalDecoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    rng = random.Random(7)
    streams = [[rng.randrange(len(tokenizer)) for _ in range(120)] for _ in range(20)]
    streams.append(tokenizer("Grüße, 日本語 and émoji 🚀🎉 — ok", add_special_tokens=False).input_ids)
    for ids in streams:
        decoder = IncrementalDecoder(decode)
        for end in range(1, len(ids) + 1):
            text, full = decoder.text(ids[:end]), decode(ids[:end])
            assert full.startswith(text), (ids[:end], text, full)
            if not full.endswith(REPLACEMENT_CHAR):  # nothing half-decoded to wait for
                assert text == full, (ids[:end], text, full)
        assert decoder.text(ids, final=True) == decode(ids)


def _chat(**params) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage("user", "Say hello"),),
                             params=SamplingParams(max_tokens=8, temperature=0, **params))


def test_logprobs_are_the_model_distribution_of_each_token(backend):
    import math

    result = backend.generate(_chat(logprobs=3))
    [choice] = result.choices
    entries = choice.logprobs["content"]
    assert len(entries) == result.usage.completion_tokens - (choice.finish_reason is FinishReason.STOP)
    assert "".join(e["token"] for e in entries).startswith(choice.text) or choice.text.startswith(
        "".join(e["token"] for e in entries)[:len(choice.text)])
    for entry in entries:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(entry["logprob"], tops[0], abs_tol=1e-5)  # greedy: the chosen token is the likeliest
        assert entry["bytes"] == list(entry["token"].encode())
    streamed = collect_stream(backend.stream(_chat(logprobs=3)))
    assert streamed.choices[0].logprobs == choice.logprobs  # the stream's pieces join to the same
    assert backend.generate(_chat()).choices[0].logprobs is None


def test_completion_logprobs_have_openai_legacy_shape(backend):
    choice = backend.generate(greedy("The cluster", max_tokens=6, logprobs=2)).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_penalties_and_logit_bias_change_the_choice(backend):
    plain = backend.generate(greedy("Hello", max_tokens=8)).choices[0].text
    first = backend._tokenizer(plain, add_special_tokens=False).input_ids[0]
    banned = backend.generate(greedy("Hello", max_tokens=8, logit_bias=((first, -100.0),))).choices[0].text
    assert not banned.startswith(backend._tokenizer.decode([first]))
    forced = backend.generate(greedy("Hello", max_tokens=3, logit_bias=((first, 3.0),))).choices[0]
    assert forced.text == backend._tokenizer.decode([first] * 3)  # the random weights' logits are small
    penalised = backend.generate(greedy("Hello", max_tokens=3, logit_bias=((first, 3.0),),
                                        frequency_penalty=2.0, presence_penalty=2.0)).choices[0]
    assert penalised.text.startswith(backend._tokenizer.decode([first]))
    assert penalised.text != forced.text  # once generated, the token is pushed down by 4


def test_a_list_of_prompts_and_token_ids_answer_each(backend):
    texts = ["Hello", "The cluster"]
    ids = backend._tokenizer("Hello").input_ids
    result = backend.generate(GenerationRequest(prompt=(*texts, tuple(ids)),
                                                params=SamplingParams(max_tokens=6, temperature=0, n=2)))
    assert [c.index for c in result.choices] == [0, 1, 2, 3, 4, 5]
    alone = [backend.generate(greedy(t, max_tokens=6)).choices[0].text for t in texts]
    assert [c.text for c in result.choices] == [alone[0], alone[0], alone[1], alone[1], alone[0], alone[0]]
    assert result.usage.prompt_tokens == 2 * len(ids) + len(backend._tokenizer("The cluster").input_ids)


def test_embeddings_are_normalised_mean_pooled_states(backend):
    import math

    from nexus.inference.openai_shapes import floats
    from nexus.inference.types import EmbeddingRequest

    result = backend.embed(EmbeddingRequest(("Hello", "The quick brown fox", "Hello")))
    vectors = [floats(v) for v in result.vectors]
    assert len(vectors) == 3 and len(vectors[0]) == backend._model.config.hidden_size
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]  # padding next to a longer input changes nothing
    alone = floats(backend.embed(EmbeddingRequest(("Hello",))).vectors[0])
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(alone, vectors[0]))
    assert result.prompt_tokens == 2 * len(backend._tokenizer("Hello").input_ids) + len(
        backend._tokenizer("The quick brown fox").input_ids)


def test_fields_the_backend_cannot_honour_are_refused_by_name(backend):
    from nexus.inference.openai_shapes import Endpoint, UnsupportedParameterError, parse_body

    for extra, param in [({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                          "tool_choice"), ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"top_k": 5}, "top_k")]:
        call = parse_body(Endpoint.CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra})
        with pytest.raises(UnsupportedParameterError) as caught:
            backend.generate(call.generation)
        assert caught.value.param == param and caught.value.status == 400
        assert caught.value.code == "unsupported_parameter" and "transformers" in caught.value.message


class _ThreadRecorder:
    """Stands in for Redis: records each stream entry and the thread that wrote it."""

    def __init__(self):
        import threading

        self.entries, self._threading = [], threading

    def pipeline(self, transaction=False):
        return self

    def xadd(self, key, fields):
        self.entries.append((self._threading.current_thread().name, json.loads(fields["e"])))

    def expire(self, key, ttl):
        pass

    def execute(self):
        pass


def test_streaming_into_a_writer_is_done_by_the_engine_between_steps_and_adds_up_to_the_answer(backend):
    from nexus.inference.streams import EventWriter, decode_event

    request = greedy("A job is a row", 24, n=2)
    whole = backend.generate(request)
    recorder, cancels = _ThreadRecorder(), []
    writer = EventWriter(recorder, "job", 60, interval_ms=10_000)  # nothing but the first text before the end
    usage = backend.stream_into(request, writer, lambda: cancels.append(1))
    writer.usage(usage)
    events = [e for _, entry in recorder.entries for e in decode_event(entry)]
    texts = {i: "".join(e.text for e in events if isinstance(e, StreamDelta) and e.index == i) for i in (0, 1)}
    assert texts == {c.index: c.text for c in whole.choices} and usage == whole.usage
    assert events[-1] == whole.usage
    # The first text went out from the engine's thread at the end of its step; the request's own thread
    # wrote only the end (what was buffered, then usage): it was not woken per token.
    # Both choices' first token, written after the prefill, not after the decode step that follows it.
    assert recorder.entries[0][0] == "nexus-transformers"
    assert [(i, len(d)) for i, d, _ in recorder.entries[0][1]["d"]] == [(0, len(events[0].text)), (1, len(events[1].text))]
    assert [thread for thread, _ in recorder.entries[1:]] == ["MainThread"] * (len(recorder.entries) - 1)
    assert len(recorder.entries) == 3


def test_a_cancel_seen_while_waiting_stops_the_rows(backend):
    from nexus.inference.streams import EventWriter

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled

    writer = EventWriter(_ThreadRecorder(), "job", 60, interval_ms=10_000)
    with pytest.raises(Cancelled):
        no_end = tuple((token, -100.0) for token in backend._eos_ids)  # long enough to be waited on
        backend.stream_into(greedy("Hello", 400, logit_bias=no_end), writer, cancel)
    assert backend.generate(greedy("Hello", 4)).usage.completion_tokens >= 1  # the engine goes on serving
