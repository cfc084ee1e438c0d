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
    named = parse_line(2, json.dumps({"custom_id": "b", "prompt": "x"}), "tiny")
    assert named.custom_id == "b" and "custom_id" not in named.call.request.fields()  # not refused as a field


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
        self.expires = getattr(self, "expires", 0) + 1

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


def test_bodies_keep_every_field_as_sent_and_parse_the_ones_nexus_reads():
    body = {"model": "m", "prompt": [[1, 2, 3], [4]], "logprobs": 2, "presence_penalty": 0.5, "top_k": 4,
            "logit_bias": {"7": -1}, "response_format": {"type": "json_object"}}
    call = parse_body(Endpoint.COMPLETIONS, body)
    assert call.request.body == body and call.request.fields() == set(body) - set()
    assert call.request.prompts == ((1, 2, 3), (4,))
    with pytest.raises(InvalidRequestError, match="str, list.str., list.int., list.list.int"):
        parse_body(Endpoint.COMPLETIONS, {"model": "m", "prompt": [[1], "mixed"]})
    assert call.request.params.logprobs == 2 and call.request.params.logit_bias == ((7, -1.0),)
    chat = parse_body(Endpoint.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                      "top_logprobs": 3, "tool_choice": None})
    assert chat.request.params.logprobs == 3 and "tool_choice" not in chat.request.fields()  # null is absent
    assert parse_body(Endpoint.COMPLETIONS, {"model": "m", "prompt": [5, 6]}).request.prompts == ((5, 6),)
    embed = parse_body(Endpoint.EMBEDDINGS, {"model": "m", "input": ["a", "b"]})
    assert embed.endpoint is Endpoint.EMBEDDINGS and embed.request.inputs == ("a", "b")


@pytest.mark.parametrize("endpoint, body, param", [
    (Endpoint.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, "top_logprobs"),
    (Endpoint.CHAT, {"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    (Endpoint.CHAT, {"model": "m", "messages": []}, "messages"),
    (Endpoint.COMPLETIONS, {"model": "m", "prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    (Endpoint.COMPLETIONS, {"model": "m", "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    (Endpoint.COMPLETIONS, {"model": "m", "prompt": "x", "n": 1.0}, "n"),
    (Endpoint.EMBEDDINGS, {"model": "m", "input": 5}, "input"),
    (Endpoint.EMBEDDINGS, {"model": "m", "input": []}, "input"),
    (Endpoint.COMPLETIONS, {"model": "m", "prompt": []}, "prompt"),
    (Endpoint.EMBEDDINGS, {"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format"),
])
def test_wrong_fields_are_named(endpoint, body, param):
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(endpoint, body)
    assert caught.value.param == param and caught.value.status == 400


def test_capabilities_refuse_what_the_backend_cannot_honour_and_pass_the_rest():
    from nexus.inference.capabilities import IN_PROCESS, PASS_THROUGH
    from nexus.inference.openai_shapes import UnsupportedParameterError

    messages = [{"role": "user", "content": "x"}]
    for endpoint, extra, param in [
        (Endpoint.CHAT, {"tools": [{"type": "function"}], "tool_choice": "required"}, "tool_choice"),
        (Endpoint.CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
        (Endpoint.COMPLETIONS, {"echo": True}, "echo"),
        (Endpoint.COMPLETIONS, {"min_p": 0.1}, "min_p"),  # a vLLM extra, unknown to OpenAI
        (Endpoint.EMBEDDINGS, {"dimensions": 8}, "dimensions"),
        (Endpoint.CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content"),
        (Endpoint.CHAT, {"messages": [{"role": "assistant", "content": "", "tool_calls": []}]},
         "messages[0].tool_calls"),
    ]:
        base = {"model": "tiny", **({"messages": messages} if endpoint is Endpoint.CHAT else
                                    {"prompt": "x"} if endpoint is Endpoint.COMPLETIONS else {"input": "x"})}
        call = parse_body(endpoint, {**base, **extra})
        with pytest.raises(UnsupportedParameterError) as caught:
            IN_PROCESS.check(call.request)
        assert (caught.value.param, caught.value.code, caught.value.status) == (param, "unsupported_parameter", 400)
        PASS_THROUGH.check(call.request)  # an engine that takes the body as sent judges for itself
    IN_PROCESS.check(parse_body(Endpoint.CHAT, {"model": "tiny", "messages": messages, "logprobs": True,
                                                "top_logprobs": 2, "n": 2, "seed": 1, "stop": "x", "user": "u",
                                                "frequency_penalty": 1, "stream": True,
                                                "stream_options": {"include_usage": True}}).request)


def test_pass_through_bodies_go_on_as_the_client_sent_them():
    body = {"model": "public-name", "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "top_k": 3,
            "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    call = parse_body(Endpoint.CHAT, body)
    sent = request_body("served", call.request, stream=True)
    assert sent == {**body, "model": "served", "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert body["model"] == "public-name"  # the client's body itself is untouched
    assert finish_reason("tool_calls") is FinishReason.TOOL_CALLS


def test_logprobs_and_tool_calls_survive_the_stream():
    recorder = _Recorder()
    writer = EventWriter(recorder, "job", 60, interval_ms=10_000)
    lp = lambda *tokens: {"content": [{"token": t, "logprob": -1.0, "bytes": [], "top_logprobs": []} for t in tokens]}
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    writer.delta(StreamDelta(0, "a", logprobs=lp("a")))
    writer.delta(StreamDelta(0, "b", logprobs=lp("b")))
    writer.delta(StreamDelta(0, "c", logprobs=lp("c")))
    writer.delta(StreamDelta(0, "", extra={"tool_calls": [call]}))
    writer.delta(StreamDelta(0, "", FinishReason.TOOL_CALLS))
    writer.usage(Usage(1, 4))
    decoded = [e for raw in recorder.events for e in decode_event(raw)]
    assert decoded[:2] == [StreamDelta(0, "a", logprobs=lp("a")), StreamDelta(0, "bc", logprobs=lp("b", "c"))]
    assert decoded[2] == StreamDelta(0, "", extra={"tool_calls": [call]})
    merged = merge_deltas(decoded)
    assert merged[0] == StreamDelta(0, "abc", logprobs=lp("a", "b", "c"))
    assert merged[1].extra == {"tool_calls": [call]} and merged[2].finish_reason is FinishReason.TOOL_CALLS
    result = GenerationResult((Choice(0, "", FinishReason.TOOL_CALLS, lp("x"), {"tool_calls": [call]}),), Usage(1, 1))
    writer.result(result)
    assert decode_event(recorder.events[-1]) == [result]


def test_responses_match_their_documented_models():
    from nexus.inference import openai_schema as schema
    from nexus.inference.openai_shapes import (ModelCard, build_chunk, build_embeddings, build_models_list,
                                               build_response, build_usage_chunk, float32_bytes)
    from nexus.inference.types import EmbeddingResult

    chat = parse_body(Endpoint.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                                      "stream_options": {"include_usage": True}})
    lp = {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]}]}]}
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    answer = build_response(chat, GenerationResult((Choice(0, "", FinishReason.TOOL_CALLS, lp, {"tool_calls": [call]}),),
                                                   Usage(2, 3)))
    parsed = schema.ChatCompletion.model_validate(answer)
    assert parsed.choices[0].message.content is None and parsed.choices[0].message.tool_calls == [call]
    chunk = build_chunk(chat, "id", 1, StreamDelta(0, "a", logprobs=lp), first=True)
    assert chunk["usage"] is None and schema.ChatCompletionChunk.model_validate(chunk)
    schema.ChatCompletionChunk.model_validate(build_usage_chunk(chat, "id", 1, Usage(1, 2)))
    completion = parse_body(Endpoint.COMPLETIONS, {"model": "m", "prompt": "x"})
    assert "usage" not in build_chunk(completion, "id", 1, StreamDelta(0, "a"))  # only when include_usage asks
    legacy = {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1}], "text_offset": [0]}
    schema.Completion.model_validate(build_response(completion, GenerationResult(
        (Choice(0, "a", FinishReason.LENGTH, legacy),), Usage(1, 1))))
    embed = parse_body(Endpoint.EMBEDDINGS, {"model": "m", "input": ["a", "b"]})
    vectors = EmbeddingResult((float32_bytes([0.5, -1.0]), float32_bytes([1.0, 0.0])), 4)
    floats = schema.EmbeddingList.model_validate(build_embeddings(embed, vectors))
    assert floats.data[0].embedding == [0.5, -1.0] and floats.usage.total_tokens == 4
    b64 = parse_body(Endpoint.EMBEDDINGS, {"model": "m", "input": "a", "encoding_format": "base64"})
    assert build_embeddings(b64, vectors)["data"][1]["embedding"] == "AACAPwAAAAA="
    models = schema.OpenAIModelList.model_validate(build_models_list([ModelCard("tiny", 1_700_000_000, 512)]))
    assert models.data[0].max_model_len == 512 and models.data[0].created == 1_700_000_000


def test_a_stream_expiry_is_set_once_not_with_every_entry():
    recorder = _Recorder()
    writer = EventWriter(recorder, "job", 600, interval_ms=0)
    for token in ["a", "b", "c", "d"]:
        writer.delta(StreamDelta(0, token))
    writer.usage(Usage(1, 4))
    assert len(recorder.events) == 5 and recorder.expires == 1  # an EXPIRE per entry doubled the commands


def test_a_step_flusher_writes_first_text_at_once_and_the_rest_per_interval_in_one_pipeline():
    from nexus.inference.streams import StepFlusher

    recorder, flusher = _Recorder(), StepFlusher()
    first, second = EventWriter(recorder, "one", 60, interval_ms=10_000), EventWriter(recorder, "two", 60, 10_000)
    flusher.add(first, StreamDelta(0, "He"))
    assert recorder.events == []  # nothing is written in the middle of a step
    flusher.after_step()
    assert recorder.events == [{"t": "deltas", "d": [[0, "He", None]]}]  # the first text, at the step's end
    flusher.add(first, StreamDelta(0, "llo"))
    flusher.after_step()
    assert len(recorder.events) == 1  # not due before the interval
    flusher.add(second, StreamDelta(0, "Hi"))  # another request's first text: due, with what waits
    flusher.after_step()
    assert recorder.events[1:] == [{"t": "deltas", "d": [[0, "llo", None]]}, {"t": "deltas", "d": [[0, "Hi", None]]}]
    flusher.add(first, StreamDelta(0, "!", FinishReason.STOP))
    first.usage(Usage(1, 3))  # the request's final write takes what was buffered, in order
    assert recorder.events[3:] == [{"t": "deltas", "d": [[0, "!", "stop"]]}, {"t": "usage", "p": 1, "c": 3}]
    flusher.after_step()
    assert len(recorder.events) == 5
