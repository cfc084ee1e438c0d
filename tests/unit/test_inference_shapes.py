"""Pure pieces of inference: request validation, batch lines, stream events, catalog checks, outgoing bodies."""

from __future__ import annotations

import json
import time

import pytest

from nexus.serving.backends.openai_backend import finish_reason, request_body
from nexus.serving.batch import chunk_ranges, error_line, failed_chunk_lines, parse_line, split_lines, to_jsonl
from nexus.models.catalog import BackendKind, ModelSpec, check_spec
from nexus.inference.openai_shapes import (ContextLengthExceededError, Endpoint, InvalidRequestError, OpenAIError,
                                           parse_body)
from nexus.inference.streams import EventWriter, decode_event, merge_deltas
from nexus.inference.types import (ChatMessage, Choice, FinishReason, GenerationRequest, GenerationResult,
                                   SamplingParams, StreamDelta, Usage)


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "n": 17}, "n"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
])
def test_bad_completion_parameters_name_the_parameter(body, param):
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(Endpoint.COMPLETIONS, body)
    assert caught.value.param == param and caught.value.status == 400
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_bodies_parse_into_requests():
    call = parse_body(Endpoint.CHAT, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}], "max_completion_tokens": 5,
        "stop": "END", "seed": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert call.request.messages == (ChatMessage("user", "hi there"),)
    assert call.request.params == SamplingParams(max_tokens=5, stop=("END",), seed=3)
    assert call.stream and call.include_usage
    with pytest.raises(InvalidRequestError, match="role"):
        parse_body(Endpoint.CHAT, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]})


def test_batch_lines_accept_openai_batch_shape_and_bare_bodies():
    batch = parse_line(0, json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                      "body": {"prompt": "hi", "max_tokens": 3}}), "tiny")
    assert batch.custom_id == "a" and batch.call.endpoint is Endpoint.COMPLETIONS and batch.call.model == "tiny"
    bare = parse_line(1, json.dumps({"messages": [{"role": "user", "content": "x"}]}), "tiny")
    assert bare.custom_id == "line-1" and bare.call.endpoint is Endpoint.CHAT


@pytest.mark.parametrize("raw, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"model": "other", "prompt": "x"}), "runs model 'tiny'"),
    (json.dumps({"prompt": "x", "stream": True}), "stream"),
    (json.dumps({"url": "/v1/embeddings", "body": {}}), "url must be"),
    (json.dumps({"prompt": "x", "temperature": -1}), "temperature"),
])
def test_bad_batch_lines_become_errors_not_exceptions(raw, message):
    line = parse_line(7, raw, "tiny")
    assert line.call is None and message in line.error.message
    out = error_line(line.number, line.custom_id, line.error)
    assert out["response"]["status_code"] == 400 and out["error"]["message"] == line.error.message


def test_chunks_cover_every_line_once():
    assert chunk_ranges(0, 50) == []
    assert chunk_ranges(120, 50) == [(0, 50), (50, 100), (100, 120)]
    assert split_lines(b'{"a":1}\n\n  \n{"b":2}\n') == ['{"a":1}', '{"b":2}']


def test_a_failed_chunk_reports_every_line():
    lines = failed_chunk_lines(['{"custom_id": "x"}', "garbage"], 10, "worker lost")
    assert [(l["id"], l["custom_id"]) for l in lines] == [("batch_req_10", "x"), ("batch_req_11", "line-11")]
    assert all("worker lost" in l["error"]["message"] for l in lines)
    assert to_jsonl(lines).count(b"\n") == 2


class _Recorder:
    """Stands in for the Redis pipeline: records what the writer adds."""

    def __init__(self):
        self.events = []

    def pipeline(self, transaction=False):
        return self

    def xadd(self, key, fields):
        self.events.append(json.loads(fields["e"]))

    def expire(self, key, ttl):
        pass

    def execute(self):
        pass


def test_stream_events_round_trip():
    recorder = _Recorder()
    writer = EventWriter(recorder, "job", 60)
    delta = StreamDelta(1, "hé", FinishReason.LENGTH)
    result = GenerationResult((Choice(0, "ok", FinishReason.STOP),), Usage(3, 2))
    error = ContextLengthExceededError("too long", param="max_tokens")
    writer.delta(delta)
    writer.usage(Usage(4, 5))
    writer.result(result)
    writer.error(error)
    decoded = [event for raw in recorder.events for event in decode_event(raw)]
    assert decoded[:3] == [delta, Usage(4, 5), result]
    assert decoded[3].error.body() == error.body() and decoded[3].error.status == 400


def test_catalog_entries_are_checked():
    check_spec(ModelSpec("tiny", "/models/tiny"))
    check_spec(ModelSpec("remote", "", BackendKind.OPENAI, {"url": "http://h:8000/v1"}))
    for spec, message in [
        (ModelSpec("bad name!", "/m"), "name"),
        (ModelSpec("m", "/m", args={"url": "x"}), "unknown args"),
        (ModelSpec("m", "", BackendKind.OPENAI, {}), "args.url"),
        (ModelSpec("m", "/m", BackendKind.VLLM), "vram_mb"),
        (ModelSpec("m", "/m", BackendKind.VLLM, {"extra_args": "--x"}, vram_mb=1), "extra_args"),
        (ModelSpec("m", ""), "source"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_spec(spec)
    assert ModelSpec("m", "s3://nexus-models/llama/8b").s3_location == ("nexus-models", "llama/8b")
    assert ModelSpec("m", "", BackendKind.OPENAI, {"url": "u", "api_key": "secret"}).view()["args"]["api_key"] == "***"


def test_outgoing_openai_bodies():
    chat = GenerationRequest(messages=(ChatMessage("user", "hi"),),
                             params=SamplingParams(max_tokens=None, temperature=0, stop=("x",), seed=1, n=2))
    body = request_body("served", chat, stream=True)
    assert body == {"model": "served", "temperature": 0, "top_p": 1.0, "n": 2, "stream": True, "stop": ["x"],
                    "seed": 1, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]}
    assert request_body("m", GenerationRequest(prompt="p"), stream=False)["max_tokens"] == 16
    assert [finish_reason(v) for v in ("stop", "length", "abort", None)] == [
        FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP, None]


def test_openai_errors_keep_their_shape():
    error = OpenAIError("nope", status=503, type="service_unavailable_error", code="model_unavailable")
    assert error.body() == {"error": {"message": "nope", "type": "service_unavailable_error", "param": None,
                                      "code": "model_unavailable"}}


def test_the_first_delta_goes_out_at_once_and_the_rest_per_interval():
    recorder = _Recorder()
    writer = EventWriter(recorder, "job", 60, interval_ms=200)
    for token in ["He", "llo", ",", " wor", "ld"]:
        writer.delta(StreamDelta(0, token))
    assert recorder.events == [{"t": "deltas", "d": [[0, "He", None]]}]  # time to first token is kept
    writer.delta(StreamDelta(0, "!", FinishReason.STOP))
    writer.usage(Usage(3, 6))  # the final event writes what was buffered first, in order
    assert recorder.events[1:] == [{"t": "deltas", "d": [[0, "llo, world!", "stop"]]}, {"t": "usage", "p": 3, "c": 6}]


def test_buffered_text_is_flushed_without_waiting_for_the_next_token():
    recorder = _Recorder()
    writer = EventWriter(recorder, "job", 60, interval_ms=10)
    writer.delta(StreamDelta(0, "a"))
    writer.delta(StreamDelta(1, "b"))
    writer.delta(StreamDelta(1, "c"))
    deadline = time.monotonic() + 5
    while len(recorder.events) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.events[1] == {"t": "deltas", "d": [[1, "bc", None]]}


def test_a_read_batch_is_one_delta_per_choice_then_the_final_event():
    events = [StreamDelta(0, "a"), StreamDelta(1, "x"), StreamDelta(0, "b", FinishReason.LENGTH),
              StreamDelta(1, "y", FinishReason.STOP), Usage(1, 4)]
    assert merge_deltas(events) == [StreamDelta(0, "ab", FinishReason.LENGTH), StreamDelta(1, "xy", FinishReason.STOP),
                                    Usage(1, 4)]
    assert decode_event({"t": "delta", "i": 0, "x": "old", "f": None}) == [StreamDelta(0, "old")]  # earlier workers
