"""Fixtures for inference tests: the tiny model (made once per session) and a worker serving it.

    tiny_model_dir  the tiny Llama model folder
    model_worker    a real `nexus worker --model tiny` process for the session
    tiny_served     per test: the catalog entry exists and an instance is live (tables and
                    Redis are emptied before each test, so this re-declares and waits)
"""

from __future__ import annotations

import pytest

from nexus.models import catalog, liveness
from nexus.models.catalog import ModelSpec
from nexus.models.placement import ParallelismPlan, Strategy
from tests.support import start_worker, wait_for

TINY = "tiny"
# Test modules import these fixtures, and pytest makes a session fixture per importing module:
# this holds the one model folder and the one worker they all share.
_SHARED: dict = {}
MODEL_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NEXUS_INFERENCE_HEARTBEAT_SECONDS": "0.5",
             "NEXUS_INFERENCE_BATCH_CHUNK_LINES": "50",
             # Several tokens long even on a loaded 2-core machine (~30 ms a token there): entries hold several tokens.
             "NEXUS_INFERENCE_STREAM_INTERVAL_MS": "150"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nexus.serving.tiny import make_tiny_model

    if "model_dir" not in _SHARED:
        _SHARED["model_dir"] = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    return _SHARED["model_dir"]


def tiny_spec(model_dir, name: str = TINY, **changes) -> ModelSpec:
    return ModelSpec(name=name, source=str(model_dir), max_model_len=512, **changes)


def declare(engine, spec: ModelSpec) -> None:
    with engine.begin() as conn:
        catalog.insert_model(conn, spec, replace=True)


@pytest.fixture(scope="session")
def model_worker(settings, session_services, session_dir, tiny_model_dir, live_api):  # objects: by lease
    if "worker" not in _SHARED:
        declare(session_services.engine, tiny_spec(tiny_model_dir))
        # Only the model's queue: the session's other tests keep their tier queues to themselves.
        _SHARED["worker"] = start_worker(settings, session_dir, name="model-worker",
                                         extra_args=["-Q", f"model.{TINY}", "--model", TINY], extra_env=MODEL_ENV)
        _SHARED["users"] = 0
    _SHARED["users"] += 1
    yield _SHARED["worker"]
    _SHARED["users"] -= 1
    if not _SHARED["users"]:
        _SHARED.pop("worker").stop()


def is_live(services, name: str = TINY) -> bool:
    return bool(liveness.live_instances(services.redis, name))


@pytest.fixture
def tiny_served(services, model_worker, tiny_model_dir):
    """The catalog entry and a live instance, after the per-test emptying of tables and Redis."""
    return serve_again(services, tiny_spec(tiny_model_dir))


def serve_again(services, spec: ModelSpec) -> str:
    """Declare `spec` and wait until the worker started for it (standing by since the per-test
    emptying of tables and Redis) serves it again."""
    declare(services.engine, spec)
    try:
        wait_for(lambda: is_live(services, spec.name), timeout=3, what=f"{spec.name}'s heartbeat")
    except TimeoutError:  # the worker saw its model vanish and stands by: give it an instance to adopt
        with services.engine.begin() as conn:
            catalog.create_instance(conn, spec.name, ParallelismPlan(Strategy.CPU))
        wait_for(lambda: is_live(services, spec.name), timeout=20, what=f"{spec.name} serving again")
    return spec.name
