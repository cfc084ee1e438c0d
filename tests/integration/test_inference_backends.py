"""Weights pulled from the object store, an OpenAI-compatible server attached as a backend, and the CLI."""

from __future__ import annotations

import openai
import pytest
from click.testing import CliRunner

from nexus.cli import main
from nexus.models.catalog import BackendKind, ModelSpec
from nexus.serving.weights import COMPLETE_MARKER, upload_folder
from tests.inference_support import (MODEL_ENV, TINY, declare, model_worker, tiny_model_dir,  # noqa: F401
                                     tiny_served, tiny_spec)
from tests.support import NexusProcess, start_worker, wait_for

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def sdk(live_api, tiny_served):
    url, token = live_api
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=60)


def greedy_text(sdk, model: str, stream: bool = False) -> str:
    kwargs = {"model": model, "prompt": "Tensor parallelism", "max_tokens": 10, "temperature": 0}
    if stream:
        return "".join(c.choices[0].text for c in sdk.completions.create(stream=True, **kwargs))
    return sdk.completions.create(**kwargs).choices[0].text


def test_s3_weights_and_an_openai_compatible_server(settings, services, session_dir, live_api, tiny_model_dir, sdk):
    url, token = live_api
    upload_folder(services.store, tiny_model_dir, settings.bucket_models, "copies/tiny")
    declare(services.engine, tiny_spec(f"s3://{settings.bucket_models}/copies/tiny", name="tiny-s3"))
    # Another OpenAI-compatible server, here this very cluster's /v1 serving `tiny`, attached by URL.
    declare(services.engine, ModelSpec("tiny-remote", "", BackendKind.OPENAI,
                                       {"url": url + "/v1", "served_model_name": TINY, "api_key": token}))
    worker = start_worker(settings, session_dir, name="second-worker",
                          extra_args=["-Q", "model.tiny-s3,model.tiny-remote", "--model", "tiny-s3",
                                      "--model", "tiny-remote"], extra_env=MODEL_ENV)
    try:
        assert "model tiny-s3 serving" in worker.log_text()
        assert list((settings.data_dir / "models").glob(f"tiny-s3-*/{COMPLETE_MARKER}"))
        expected = greedy_text(sdk, TINY)
        wait_for(lambda: {m.id for m in sdk.models.list()} >= {"tiny-s3", "tiny-remote"}, what="the models listed")
        assert greedy_text(sdk, "tiny-s3") == expected  # the same weights, pulled from the object store
        assert greedy_text(sdk, "tiny-remote") == expected  # relayed to the other server and back
        assert greedy_text(sdk, "tiny-remote", stream=True) == expected
        with pytest.raises(openai.BadRequestError) as caught:  # the remote server's 400 comes through as a 400
            sdk.completions.create(model="tiny-remote", prompt="word " * 600, max_tokens=10)
        assert caught.value.code == "context_length_exceeded"
    finally:
        worker.stop()


def test_a_worker_refuses_to_serve_an_undeclared_model(settings, services, session_dir):
    process = NexusProcess(settings, ["worker", "--name", "confused", "--model", "nowhere"], session_dir,
                           "confused-worker", MODEL_ENV).start()
    assert process.process.wait(60) != 0
    assert "model 'nowhere' is not in the catalog" in process.log_text()


def test_make_tiny_writes_a_loadable_model(tmp_path):
    result = CliRunner().invoke(main, ["models", "make-tiny", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama" and tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")


def test_chat_repl_streams_answers_and_knows_its_commands(live_api, tiny_served, monkeypatch):
    url, token = live_api
    monkeypatch.setenv("NEXUS_URL", url)
    monkeypatch.setenv("NEXUS_TOKEN", token)
    result = CliRunner().invoke(main, ["chat", "--max-tokens", "5", "--temperature", "0"],
                                input="models\nstatus\nnodes\nhello there\nquit\n")
    assert result.exit_code == 0, result.output
    assert f"chatting with {TINY}" in result.output
    assert "transformers" in result.output  # the models table
    assert "database" in result.output and "broker" in result.output  # the /healthz table, a row per dependency
    prompts = [line for line in result.output.splitlines() if line.startswith("you> ")]
    assert "tier" in result.output and "GPUs" in result.output  # the nodes table
    assert len(prompts) == 5 and len(prompts[3]) > len("you> ")  # the streamed answer follows the fourth prompt
