"""The `vllm serve` command line and environment for each parallelism plan (no GPU, no vllm needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import pytest

from nexus.serving.backends.vllm_backend import Backoff, VllmLaunch, vllm_command, vllm_env
from nexus.models.placement import ParallelismPlan, Stage, Strategy


def flags(argv: list[str]) -> dict[str, str]:
    """--flag value pairs of a command line (after `vllm serve MODEL`)."""
    return {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1, 2) if argv[i].startswith("--")}


def launch_for(plan: ParallelismPlan, **kwargs) -> VllmLaunch:
    return VllmLaunch.from_plan(plan, "/models/llama", "llama", 8101, **kwargs)


def test_single_gpu():
    plan = ParallelismPlan(Strategy.SINGLE_GPU, 1, 1, (Stage("n1", (3,)),), 14_000, 0.85)
    launch = launch_for(plan, max_model_len=4096)
    argv = vllm_command(launch)
    assert argv[:3] == ["vllm", "serve", "/models/llama"]
    assert flags(argv) == {"--served-model-name": "llama", "--host": "127.0.0.1", "--port": "8101",
                           "--tensor-parallel-size": "1", "--pipeline-parallel-size": "1",
                           "--gpu-memory-utilization": "0.85", "--distributed-executor-backend": "mp",
                           "--max-model-len": "4096"}
    env = vllm_env({"PATH": "/usr/bin"}, launch)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/usr/bin"


def test_vllm_serve_gets_no_credential_of_the_cluster():
    """A model's own code runs in the server (--trust-remote-code): it inherits no key, URL or token."""
    launch = launch_for(ParallelismPlan(Strategy.SINGLE_GPU, 1, 1, (Stage("n1", (0,)),), 14_000, 0.85))
    worker_env = {"PATH": "/usr/bin", "HOME": "/root", "NCCL_DEBUG": "WARN", "VLLM_LOGGING_LEVEL": "INFO",
                  "NEXUS_DATABASE_URL": "postgresql://w:pw@db/nexus", "NEXUS_REDIS_URL": "redis://:pw@r:6379/0",
                  "NEXUS_S3_SECRET_KEY": "s3-secret", "NEXUS_JOIN_TOKEN": "nxj_x", "AWS_SECRET_ACCESS_KEY": "aws",
                  "MINIO_ROOT_PASSWORD": "root"}
    env = vllm_env(worker_env, launch)
    assert {"PATH", "HOME", "NCCL_DEBUG", "VLLM_LOGGING_LEVEL"} <= set(env)
    assert not any(name.startswith(("NEXUS_", "AWS_", "MINIO_")) for name in env)
    assert "pw" not in "".join(env.values()) and "secret" not in "".join(env.values())


def test_tensor_parallel_on_one_node():
    plan = ParallelismPlan(Strategy.TENSOR_PARALLEL, 4, 1, (Stage("n1", (0, 1, 2, 3)),), 70_000)
    launch = launch_for(plan)
    f = flags(vllm_command(launch))
    assert (f["--tensor-parallel-size"], f["--pipeline-parallel-size"]) == ("4", "1")
    assert f["--distributed-executor-backend"] == "mp" and "--max-model-len" not in f
    assert vllm_env({}, launch)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_pipeline_parallel_on_one_node_sees_every_stage_gpu():
    plan = ParallelismPlan(Strategy.PIPELINE_PARALLEL, 1, 3, (Stage("n1", (0,)), Stage("n1", (1,)), Stage("n1", (2,))),
                           20_000)
    launch = launch_for(plan)
    assert launch.gpus == (0,)  # the head stage
    f = flags(vllm_command(launch))
    assert (f["--tensor-parallel-size"], f["--pipeline-parallel-size"]) == ("1", "3")
    assert f["--distributed-executor-backend"] == "mp"


def test_pipeline_parallel_across_nodes_runs_on_ray():
    plan = ParallelismPlan(Strategy.PIPELINE_PARALLEL, 1, 2, (Stage("a", (0,)), Stage("b", (0,))), 20_000)
    launch = launch_for(plan)
    assert launch.multi_node
    f = flags(vllm_command(launch))
    assert (f["--pipeline-parallel-size"], f["--distributed-executor-backend"]) == ("2", "ray")
    assert vllm_env({}, launch)["CUDA_VISIBLE_DEVICES"] == "0"


def test_tensor_and_pipeline_parallel_across_nodes():
    plan = ParallelismPlan(Strategy.HYBRID_TP_PP, 8, 2, (Stage("a", tuple(range(8))), Stage("b", tuple(range(8)))),
                           62_500, 0.9)
    launch = launch_for(plan, extra_args=["--dtype", "bfloat16", "--enable-prefix-caching"])
    argv = vllm_command(launch, executable="/opt/venv/bin/vllm")
    assert argv[0] == "/opt/venv/bin/vllm"
    f = flags(argv)
    assert (f["--tensor-parallel-size"], f["--pipeline-parallel-size"]) == ("8", "2")
    assert f["--distributed-executor-backend"] == "ray" and f["--gpu-memory-utilization"] == "0.90"
    assert argv[-3:] == ["--dtype", "bfloat16", "--enable-prefix-caching"]  # catalog extras come last
    assert vllm_env({}, launch)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"


def test_api_key_is_passed_when_set():
    launch = VllmLaunch("/m", "m", 8100, api_key="k-123")
    assert flags(vllm_command(launch))["--api-key"] == "k-123"


def test_restart_backoff_doubles_and_caps():
    backoff = Backoff(base_seconds=1, max_seconds=10)
    assert [backoff.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_nothing_imports_vllm():
    import nexus.serving.backends  # noqa: F401
    import nexus.serving.backends.vllm_backend  # noqa: F401

    assert "vllm" not in sys.modules


# --- the command line against the pinned vLLM's own option names -------------------------------------

PINNED = json.loads((Path(__file__).parents[1] / "fixtures" / "vllm" / "serve-options-0.33.0.json").read_text())
PLANS = {
    "single_gpu": ParallelismPlan(Strategy.SINGLE_GPU, 1, 1, (Stage("a", (0,)),), 14_000),
    "tensor_parallel": ParallelismPlan(Strategy.TENSOR_PARALLEL, 4, 1, (Stage("a", (0, 1, 2, 3)),), 70_000),
    "pipeline_parallel_one_node": ParallelismPlan(Strategy.PIPELINE_PARALLEL, 1, 3,
                                                  (Stage("a", (0,)), Stage("a", (1,)), Stage("a", (2,))), 20_000),
    "pipeline_parallel_across_nodes": ParallelismPlan(Strategy.PIPELINE_PARALLEL, 1, 2,
                                                      (Stage("a", (0,)), Stage("b", (0,))), 20_000),
    "hybrid_tp_pp": ParallelismPlan(Strategy.HYBRID_TP_PP, 8, 2, (Stage("a", tuple(range(8))),
                                                                  Stage("b", tuple(range(8)))), 62_500),
}


def test_the_fixture_is_of_the_vllm_the_gpu_extra_pins():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert f'"vllm=={PINNED["vllm"]}"' in pyproject, "bump tests/fixtures/vllm/ with the vllm pin"


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_flag_of_every_plan_is_an_option_of_the_pinned_vllm(name):
    launch = launch_for(PLANS[name], max_model_len=4096)
    argv = vllm_command(VllmLaunch(**{**launch.__dict__, "api_key": "k"}))
    used = [a for a in argv if a.startswith("--")]
    assert {"--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend"} <= set(used)
    unknown = sorted(set(used) - set(PINNED["options"]))
    assert not unknown, f"vllm {PINNED['vllm']} has no option {unknown}"
    backend = flags(argv)["--distributed-executor-backend"]
    assert backend in PINNED["distributed_executor_backend"]
    assert backend == ("ray" if PLANS[name].multi_node else "mp")


def test_an_embedding_model_runs_vllm_as_a_pooling_server():
    from nexus.models.catalog import BackendKind, ModelSpec, check_spec
    from nexus.serving.backends import vllm_extra_args

    spec = ModelSpec("e5", "/models/e5", BackendKind.VLLM, {"task": "embed", "extra_args": ["--seed", "1"]}, vram_mb=1)
    check_spec(spec)
    plan = ParallelismPlan(Strategy.SINGLE_GPU, 1, 1, (Stage("n1", (0,)),), 1_000)
    argv = vllm_command(launch_for(plan, extra_args=vllm_extra_args(spec)))
    # vLLM 0.33's names (vllm/engine/arg_utils.py: --runner, --convert); `--task embed` no longer exists.
    assert argv[-6:] == ["--runner", "pooling", "--convert", "embed", "--seed", "1"]
    assert {"--runner", "--convert"} <= set(PINNED["options"])
    assert vllm_extra_args(ModelSpec("l", "/m", BackendKind.VLLM, {}, vram_mb=1)) == ()
    with pytest.raises(ValueError, match="args.task"):
        check_spec(ModelSpec("e5", "/m", BackendKind.VLLM, {"task": "classify"}, vram_mb=1))
