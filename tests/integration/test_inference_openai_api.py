"""The official `openai` SDK, unmodified, against the real API process and a real worker serving the tiny model."""

from __future__ import annotations

import time

import openai
import pytest

from nexus.inference.types import GenerationRequest, SamplingParams
from tests.support import wait_for
from tests.inference_support import TINY, declare, model_worker, tiny_model_dir, tiny_served, tiny_spec  # noqa: F401

pytestmark = pytest.mark.timeout(120)

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]


@pytest.fixture
def sdk(live_api, tiny_served):
    url, token = live_api
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=60)


def test_models_are_listed(sdk):
    assert TINY in [m.id for m in sdk.models.list()]
    assert sdk.models.retrieve(TINY).id == TINY


def test_completion(sdk):
    response = sdk.completions.create(model=TINY, prompt="The cluster", max_tokens=8, temperature=0)
    assert response.object == "text_completion" and response.model == TINY
    [choice] = response.choices
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert response.usage.prompt_tokens >= 1 and 1 <= response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_greedy_answers_match_the_bare_backend(sdk, tiny_model_dir):
    from nexus.serving.backends.transformers_backend import TransformersBackend

    bare = TransformersBackend(tiny_model_dir)
    try:
        expected = bare.generate(GenerationRequest(prompt="A job is a row",
                                                   params=SamplingParams(max_tokens=12, temperature=0)))
    finally:
        bare.close()
    response = sdk.completions.create(model=TINY, prompt="A job is a row", max_tokens=12, temperature=0)
    assert response.choices[0].text == expected.choices[0].text
    assert response.usage.completion_tokens == expected.usage.completion_tokens


def test_chat_with_n_seed_and_stop(sdk):
    response = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=6, n=2, seed=7, temperature=0.9,
                                           top_p=0.95)
    assert response.object == "chat.completion" and [c.index for c in response.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in response.choices)
    again = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=6, n=2, seed=7, temperature=0.9,
                                        top_p=0.95)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    assert response.usage.completion_tokens <= 12
    text = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=16, temperature=0).choices[0].message.content
    if len(text) > 4:
        stop = text[2:4]
        cut = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=16, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_streaming_chat(sdk):
    full = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion_without_usage(sdk):
    chunks = list(sdk.completions.create(model=TINY, prompt="Hello", max_tokens=10, temperature=0, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].text for c in chunks) == \
        sdk.completions.create(model=TINY, prompt="Hello", max_tokens=10, temperature=0).choices[0].text


def test_unknown_model_is_404(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="no-such-model", prompt="x")
    assert caught.value.code == "model_not_found" and "no-such-model" in caught.value.message


@pytest.mark.parametrize("params, param", [({"temperature": 5}, "temperature"), ({"n": 100}, "n"),
                                           ({"max_tokens": -1}, "max_tokens"), ({"top_p": 2}, "top_p")])
def test_bad_parameters_are_400(sdk, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=TINY, messages=CHAT, **params)
    assert caught.value.param == param


def test_too_many_tokens_is_400(sdk, services):
    with pytest.raises(openai.BadRequestError) as caught:  # refused by the API from the catalog's max_model_len
        sdk.completions.create(model=TINY, prompt="x", max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:  # refused by the worker, which counts the prompt
        sdk.completions.create(model=TINY, prompt="word " * 500, max_tokens=100)
    assert caught.value.code == "context_length_exceeded" and "512" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # the same when streaming: an error, not a broken stream
        sdk.completions.create(model=TINY, prompt="word " * 500, max_tokens=100, stream=True)
    assert caught.value.code == "context_length_exceeded"
    # The worker's two refusals are the requests' own failures, never its node's (nexus.jobs.failures).
    wait_for(lambda: failed_attempt_kinds(services) == ["job", "job"], timeout=10, what="two failures of kind job")


def failed_attempt_kinds(services) -> list[str]:
    from sqlalchemy import text

    with services.engine.connect() as conn:
        return [row[0] for row in conn.execute(text(
            "SELECT failure_kind FROM job_events WHERE from_state = 'running' AND to_state IN ('retrying', 'failed')"))]


def test_a_bad_api_key_is_401(live_api, tiny_served):
    url, _ = live_api
    client = openai.OpenAI(base_url=url + "/v1", api_key="nx_not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.body["type"] == "authentication_error"


def test_a_model_nobody_serves_is_503_at_once(sdk, services, tiny_model_dir):
    declare(services.engine, tiny_spec(tiny_model_dir, name="idle-model"))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="idle-model", messages=CHAT)
    assert time.monotonic() - started < 5
    assert caught.value.status_code == 503 and caught.value.code == "model_unavailable"
    assert "POST /api/v1/models/idle-model/instances" in caught.value.message


def test_streamed_text_comes_in_multi_token_deltas_and_equals_the_whole_answer(sdk):
    prompt = "The quick brown fox"
    whole = sdk.completions.create(model=TINY, prompt=prompt, max_tokens=96, temperature=0)
    started = time.monotonic()
    chunks = list(sdk.completions.create(model=TINY, prompt=prompt, max_tokens=96, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    elapsed = time.monotonic() - started
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    tokens = chunks[-1].usage.completion_tokens
    assert tokens == whole.usage.completion_tokens
    # The worker writes a request's new text per stream interval (150 ms here), not per token: the first
    # delta alone, then one chunk per interval at most. One entry per token gave about one chunk per token.
    # On a loaded machine generation slows down and the chunks grow in number, never past this bound.
    interval = 0.150
    assert tokens > 16 and len(texts) <= 2 + 1.5 * elapsed / interval, (len(texts), tokens, elapsed)
    if elapsed < tokens * interval / 4:  # fast enough to tell the two designs apart
        assert len(texts) <= tokens / 2, (len(texts), tokens, elapsed)


def _slots_of(services, model: str) -> int:
    from nexus.models.liveness import SLOTS_KEY

    return sum(int(v) for v in services.redis.hgetall(SLOTS_KEY.format(model=model)).values())


def _take_all_but(services, model: str, keep_free: int) -> list:
    """Take serving slots as other API processes would, leaving `keep_free` of them."""
    taken = []
    for i in range(_slots_of(services, TINY) - keep_free):
        slot = services.admission.acquire(model, f"elsewhere-{i}", hold_seconds=60, wait_seconds=0)
        assert slot is not None
        taken.append(slot)
    return taken


def _second_api(settings, session_dir, name: str, **changes):
    """Another API process on the same cluster with `changes` to its settings; yields its URL."""
    from nexus.localservers import free_port
    from tests.support import start_api

    # node_api_port 0: the session's master already serves the node API; a second bind would fail and stop this one
    process, url = start_api(settings.model_copy(update={"api_port": free_port(), "node_api_port": 0, **changes}),
                             session_dir, name=name)
    yield url
    process.stop()


@pytest.fixture(scope="module")
def impatient_api(settings, session_dir):
    """A second API process whose requests wait at most 1 s for a serving slot."""
    yield from _second_api(settings, session_dir, "api-impatient", inference_admission_wait_seconds=1.0)


def test_every_instance_full_means_429_after_the_admission_bound(sdk, services, impatient_api, live_api):
    taken = _take_all_but(services, TINY, keep_free=0)
    client = openai.OpenAI(base_url=impatient_api + "/v1", api_key=live_api[1], max_retries=0, timeout=30)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=TINY, prompt="Hello", max_tokens=4, stream=True)
    assert 1.0 <= time.monotonic() - started < 10
    assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"
    assert "busy" in caught.value.message
    taken.pop().release()  # a slot comes free: the next request is served
    assert client.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0).choices[0].text
    for slot in taken:
        slot.release()


def test_the_model_view_and_metrics_count_the_requests_waiting_for_a_slot(sdk, services, live_api):
    from concurrent.futures import ThreadPoolExecutor

    import requests

    url, token = live_api
    headers = {"Authorization": f"Bearer {token}"}
    taken = _take_all_but(services, TINY, keep_free=0)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(sdk.completions.create, model=TINY, prompt="Hello", max_tokens=4, temperature=0)
                   for _ in range(2)]
        view = wait_for(lambda: (v := requests.get(f"{url}/api/v1/models/{TINY}", headers=headers,
                                                   timeout=10).json())["requests"]["waiting"] == 2 and v,
                        timeout=15, what="two requests counted as waiting")
        assert view["requests"]["in_flight"] == view["requests"]["capacity"] == len(taken)
        metrics = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
        assert f'nexus_model_requests{{model="{TINY}",state="waiting"}} 2.0' in metrics
        for slot in taken:
            slot.release()
        assert all(w.result(timeout=30).choices[0].text is not None for w in waiting)
    wait_for(lambda: requests.get(f"{url}/api/v1/models/{TINY}", headers=headers, timeout=10).json()["requests"]
             == {"capacity": len(taken), "in_flight": 0, "waiting": 0}, timeout=10, what="the slots given back")


def test_requests_beyond_the_free_slots_wait_and_are_all_answered(sdk, services):
    from concurrent.futures import ThreadPoolExecutor

    taken = _take_all_but(services, TINY, keep_free=2)
    expected = sdk.completions.create(model=TINY, prompt="Queues carry", max_tokens=6, temperature=0).choices[0].text

    def one(_):
        return "".join(c.choices[0].text for c in sdk.completions.create(
            model=TINY, prompt="Queues carry", max_tokens=6, temperature=0, stream=True) if c.choices)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))  # 8 requests, 2 slots: 6 wait their turn, none is dropped
    assert answers == [expected] * 8
    # Every finished request gives its slot back, once its response is closed (just after the client has it).
    wait_for(lambda: services.admission.load(TINY).in_flight == len(taken), timeout=10, what="every slot given back")
    for slot in taken:
        slot.release()


@pytest.fixture(scope="module")
def one_turn_api(settings, session_dir):
    """A second API process that takes in one /v1 request at a time (nexus.api.intake)."""
    yield from _second_api(settings, session_dir, "api-one-turn", api_intake_turns=1)


def test_one_intake_turn_still_serves_streams_at_once(sdk, one_turn_api, live_api):
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=one_turn_api + "/v1", api_key=live_api[1], max_retries=0, timeout=60)

    def one(_):
        started, first, texts = time.monotonic(), None, []
        for chunk in client.completions.create(model=TINY, prompt="The quick brown fox", max_tokens=64,
                                               temperature=0, stream=True):
            first = first or time.monotonic()
            texts += [c.text for c in chunk.choices]
        return started, first, time.monotonic(), "".join(texts)

    with ThreadPoolExecutor(3) as pool:
        streams = list(pool.map(one, range(3)))
    # One turn, three streams at once: each one's first text came before any of them ended. A turn held
    # for a stream's life would have served them one by one.
    assert max(first for _, first, _, _ in streams) < min(end for _, _, end, _ in streams)
    assert len({text for *_, text in streams}) == 1


def test_a_request_waiting_for_a_serving_slot_does_not_hold_the_intake(sdk, services, one_turn_api, live_api):
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=one_turn_api + "/v1", api_key=live_api[1], max_retries=0, timeout=60)
    taken = _take_all_but(services, TINY, keep_free=0)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: client.completions.create(model=TINY, prompt="Hello", max_tokens=4,
                                                                temperature=0).choices[0].text)
        time.sleep(1.5)  # it is past the gate and waits for a slot (it would hold the only turn otherwise)
        started = time.monotonic()
        with pytest.raises(openai.NotFoundError):  # taken in while the other waits: its own answer, at once
            client.completions.create(model="no-such-model", prompt="Hello", max_tokens=4)
        assert time.monotonic() - started < 5
        taken.pop().release()
        assert waiting.result(timeout=30)
    for slot in taken:
        slot.release()


def test_models_say_when_they_were_declared_and_their_context(sdk):
    model = sdk.models.retrieve(TINY)
    assert abs(model.created - time.time()) < 3600 and model.owned_by == "nexus"
    assert model.max_model_len == 512  # as vLLM answers it (an extra field the SDK keeps)
    assert [m.max_model_len for m in sdk.models.list() if m.id == TINY] == [512]


def test_embeddings_in_base64_and_floats(sdk):
    import math

    texts = ["Nexus turns racks into clusters", "A job is a row", "Nexus turns racks into clusters"]
    packed = sdk.embeddings.create(model=TINY, input=texts)  # the SDK asks for base64 and unpacks it
    assert [d.index for d in packed.data] == [0, 1, 2] and packed.model == TINY
    vectors = [d.embedding for d in packed.data]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 8
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert packed.usage.prompt_tokens == packed.usage.total_tokens > 3
    floats = sdk.embeddings.create(model=TINY, input=texts[1], encoding_format="float")
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(floats.data[0].embedding, vectors[1], strict=True))
    tokens = sdk.embeddings.create(model=TINY, input=[[5, 6, 7], [8]], encoding_format="float")
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError) as caught:  # the tiny model has no smaller vectors to give
        sdk.embeddings.create(model=TINY, input="x", dimensions=4)
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", "dimensions")


def test_logprobs_with_top_logprobs(sdk):
    response = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3)
    [choice] = response.choices
    entries = choice.logprobs.content
    assert entries and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    assert "".join(e.token for e in entries).startswith(choice.message.content)
    chunks = list(sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    legacy = sdk.completions.create(model=TINY, prompt="The cluster", max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=3).choices[0].logprobs is None


def test_two_choices_streamed_with_usage(sdk, live_api):
    import json

    import requests

    whole = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=8, n=2, seed=3, temperature=0.8)
    chunks = list(sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=8, n=2, seed=3, temperature=0.8,
                                              stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == whole.choices[index].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    url, token = live_api
    raw = requests.post(url + "/v1/completions", headers={"Authorization": f"Bearer {token}"}, stream=True, timeout=60,
                        json={"model": TINY, "prompt": "Hello", "max_tokens": 4, "stream": True,
                              "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in raw.iter_lines(decode_unicode=True)
              if line.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])  # as OpenAI sends them
    assert events[-1]["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
])
def test_what_the_cpu_backend_cannot_honour_is_refused_by_name(sdk, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=4, **fields)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == param
    assert "transformers" in caught.value.message


def test_penalties_and_prompt_lists(sdk):
    response = sdk.completions.create(model=TINY, prompt=["Hello", "The cluster"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    alone = sdk.completions.create(model=TINY, prompt="The cluster", max_tokens=4, temperature=0).choices[0].text
    assert response.choices[2].text == response.choices[3].text == alone
    penalised = sdk.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0, frequency_penalty=2,
                                       presence_penalty=1, logit_bias={"5": 1.5})
    assert penalised.choices[0].finish_reason in ("stop", "length")


def test_the_v1_bodies_are_in_the_openapi_document(live_api):
    import requests

    spec = requests.get(live_api[0] + "/openapi.json", timeout=10).json()
    body = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/EmbeddingRequest"}
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "logprobs", "top_logprobs", "tools", "stream_options"} <= set(chat)
    answer = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "OpenAIModelList" in spec["components"]["schemas"] and "ChatCompletionChunk" in spec["components"]["schemas"]


@pytest.fixture(scope="module")
def relay_worker(settings, session_services, session_dir, live_api):
    """A worker whose `openai` backend is this same API, asking for the tiny model: the pass-through path."""
    from tests.inference_support import MODEL_ENV
    from tests.support import start_worker

    declare(session_services.engine, _relay_spec(live_api))
    worker = start_worker(settings, session_dir, name="relay-worker", extra_env=MODEL_ENV,
                          extra_args=["-Q", "model.relay", "--model", "relay"])
    yield worker
    worker.stop()


def _relay_spec(live_api):
    from nexus.models.catalog import BackendKind, ModelSpec

    url, token = live_api
    return ModelSpec("relay", "", BackendKind.OPENAI, {"url": url + "/v1", "api_key": token, "served_model_name": TINY})


def test_an_openai_backend_passes_the_body_through(sdk, services, relay_worker, live_api):
    from tests.inference_support import serve_again

    serve_again(services, _relay_spec(live_api))
    direct = sdk.chat.completions.create(model=TINY, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2)
    relayed = sdk.chat.completions.create(model="relay", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert relayed.model == "relay" and relayed.choices[0].message.content == direct.choices[0].message.content
    assert relayed.choices[0].logprobs.content == direct.choices[0].logprobs.content  # the engine's answer, kept
    # The relay's own backend refuses nothing: the engine behind it judges, and its 400 comes back as it was.
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="relay", messages=CHAT, max_tokens=4, tool_choice="required",
                                    tools=[{"type": "function", "function": {"name": "now"}}])
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "tool_choice"
    assert "'tiny'" in caught.value.message  # refused by the model behind the relay, not by the relay
    relayed_vectors = [d.embedding for d in sdk.embeddings.create(model="relay", input=["a", "b"]).data]
    direct_vectors = [d.embedding for d in sdk.embeddings.create(model=TINY, input=["a", "b"]).data]
    assert len(relayed_vectors) == 2 and all(abs(x - y) < 1e-5 for r, d in zip(relayed_vectors, direct_vectors)
                                             for x, y in zip(r, d, strict=True))
