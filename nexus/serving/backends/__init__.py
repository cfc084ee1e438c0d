"""Backends behind one interface, chosen by an Enum -> builder map.

Each builder imports its backend module only when used: a CPU node never
imports anything GPU-related, and vLLM itself is never imported at all (it
runs as a `vllm serve` subprocess).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nexus.config import Settings
from nexus.inference.capabilities import IN_PROCESS, Capabilities
from nexus.serving.backends.base import InferenceBackend
from nexus.models.catalog import BackendKind, ModelSpec
from nexus.models.placement import ParallelismPlan


@dataclass(frozen=True)
class BackendRequest:
    spec: ModelSpec
    settings: Settings
    model_path: Path | None = None  # None for the openai backend
    plan: ParallelismPlan | None = None
    port: int = 0  # the vLLM server's loopback port


def _transformers(request: BackendRequest) -> InferenceBackend:
    from nexus.serving.backends.transformers_backend import TransformersBackend

    args, settings = request.spec.args, request.settings
    return TransformersBackend(
        request.model_path,
        device=args.get("device", "cpu"),
        max_batch_size=int(args.get("max_batch_size", settings.inference_max_batch_size)),
        batch_window_ms=float(args.get("batch_window_ms", settings.inference_batch_window_ms)),
        torch_threads=int(args.get("torch_threads", settings.inference_torch_threads)) or None,
    )


# vLLM 0.33 serves /v1/embeddings from a pooling runner (`--task embed` is gone; see its
# vllm/config/model.py RunnerOption and ConvertOption); such a server generates no text.
VLLM_EMBED_ARGS = ("--runner", "pooling", "--convert", "embed")


def vllm_extra_args(spec: ModelSpec) -> tuple[str, ...]:
    """The catalog entry's own flags, after those of its task."""
    task = VLLM_EMBED_ARGS if spec.args.get("task") == "embed" else ()
    return (*task, *spec.args.get("extra_args", ()))


def _vllm(request: BackendRequest) -> InferenceBackend:
    from nexus.serving.backends.vllm_backend import VllmBackend, VllmLaunch

    spec, settings = request.spec, request.settings
    launch = VllmLaunch.from_plan(request.plan or ParallelismPlan.from_dict({"strategy": "single_gpu"}),
                                  str(request.model_path), spec.served_model_name, request.port,
                                  spec.max_model_len, vllm_extra_args(spec))
    log_path = settings.data_dir / "logs" / f"vllm-{request.port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return VllmBackend(launch, settings.vllm_executable, settings.vllm_startup_timeout_seconds,
                       max_connections=settings.inference_concurrency * 2, log_path=str(log_path))


def _openai(request: BackendRequest) -> InferenceBackend:
    from nexus.serving.backends.openai_backend import OpenAIBackend

    spec = request.spec
    return OpenAIBackend(spec.args["url"], spec.served_model_name, api_key=spec.args.get("api_key"),
                         timeout_seconds=request.settings.inference_request_timeout_seconds,
                         max_connections=request.settings.inference_concurrency * 2)


BUILDERS: dict[BackendKind, Callable[[BackendRequest], InferenceBackend]] = {
    BackendKind.TRANSFORMERS: _transformers,
    BackendKind.VLLM: _vllm,
    BackendKind.OPENAI: _openai,
}


# What each backend does with a request's fields: the API refuses what a model's backend cannot
# honour before it queues the request.
CAPABILITIES: dict[BackendKind, Capabilities] = {
    BackendKind.TRANSFORMERS: IN_PROCESS,
    BackendKind.VLLM: Capabilities("vllm", passthrough=True),
    BackendKind.OPENAI: Capabilities("openai", passthrough=True),
}


def make_backend(request: BackendRequest) -> InferenceBackend:
    return BUILDERS[request.spec.backend](request)
