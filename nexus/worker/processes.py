"""The worker processes an agent starts: one builder for tier workers and model-instance workers.

Every child is `nexus worker …` under the orphan guard, so it stops when the agent
dies, even by SIGKILL (no unsupervised orphans). Tier workers: one per usable GPU,
with CUDA_VISIBLE_DEVICES set before it starts and the solo pool (GPU work never
forks CUDA: docs/ARCHITECTURE.md, "No CUDA fork"), or one CPU worker. Instance
workers: one per model instance placed here, on that instance's GPUs.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from nexus.config import Settings
from nexus.models.instances import child_name
from nexus.models.placement import ParallelismPlan
from nexus.nodes.tiers import WorkerPlan
from nexus.queueing.routing import model_queue, node_model_queue
from nexus.supervisor import ChildSpec


def worker_argv(hostname: str, queues: Sequence[str], pool: str, concurrency: int,
                models: Sequence[str] = ()) -> list[str]:
    """`nexus worker` with these queues and pool, guarded by the orphan guard."""
    if not queues:
        raise ValueError("a worker must consume at least one queue")
    argv = [sys.executable, "-m", "nexus.agent.orphan_guard",
            sys.executable, "-m", "nexus", "worker", "--name", hostname, "--queues", ",".join(queues),
            "--pool", pool, "--concurrency", str(concurrency)]
    for model in models:
        argv += ["--model", model]
    return argv


def _node_env(base_env: Mapping[str, str], node_id: str, node_name: str, gpus: Sequence[int] | None,
              **extra: str) -> dict[str, str]:
    """The child's environment: the agent's own plus which node it serves and which GPUs it sees."""
    env = dict(base_env)
    env.update(
        NEXUS_NODE_ID=node_id,
        NEXUS_NODE_NAME=node_name,
        # NVML numbers GPUs in PCI bus order; CUDA's default is "fastest first". Same order, same GPU.
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        # Empty hides every GPU (a CPU worker on a node whose GPUs are too old or too small).
        CUDA_VISIBLE_DEVICES=",".join(str(g) for g in gpus or ()),
        **extra,
    )
    return env


# --- tier workers ---------------------------------------------------------------------------------


def worker_command(node_id: str, gpu_index: int | None, queues: Sequence[str], settings: Settings) -> list[str]:
    """The command line of one tier worker of this node."""
    role = "cpu" if gpu_index is None else f"gpu{gpu_index}"
    # GPU workers: solo pool, one task at a time in the process that owns the CUDA context.
    pool, concurrency = ("solo", 1) if gpu_index is not None else (settings.worker_pool, settings.worker_concurrency)
    # Unique per worker; Celery expands %h to the host name.
    return worker_argv(f"{role}.{node_id}@%h", queues, pool, concurrency)


def worker_env(base_env: Mapping[str, str], gpu_index: int | None, node_id: str, node_name: str,
               tier: str) -> dict[str, str]:
    return _node_env(base_env, node_id, node_name, [] if gpu_index is None else [gpu_index],
                     NEXUS_WORKER_TIER=tier)


def worker_specs(plans: Sequence[WorkerPlan], node_id: str, node_name: str, settings: Settings,
                 base_env: Mapping[str, str]) -> list[ChildSpec]:
    return [
        ChildSpec(
            name=plan.name,
            argv=tuple(worker_command(node_id, plan.gpu_index, plan.queues, settings)),
            env=worker_env(base_env, plan.gpu_index, node_id, node_name, plan.tier.value),
        )
        for plan in plans
    ]


# --- model-instance workers -------------------------------------------------------------------------


def instance_child(instance: dict[str, Any], node_id: str, node_name: str, settings: Settings,
                   base_env: Mapping[str, str], concurrency: int | None = None) -> ChildSpec:
    """The serving worker of one instance, on the instance's GPUs of this node.

    `concurrency`: requests in flight in the worker (the node's max_concurrent); None keeps
    the settings' own. It is the worker's thread count too, so that every request slot has a
    thread and a vLLM server sees that many requests at once to batch."""
    plan = ParallelismPlan.from_dict(instance.get("plan") or {})
    gpus = [gpu for stage in plan.stages if stage.node_id == node_id for gpu in stage.gpus] or \
        list(instance.get("gpus") or [])
    model = instance["model"]
    name = child_name(instance)
    # The backend lives in the worker process; requests share it on the threads pool.
    # Its model's queue, and the same model pinned to this node (a benchmark of the running instance).
    argv = worker_argv(f"{name}@{node_name}", [model_queue(model), node_model_queue(node_name, model)], "threads",
                       concurrency or settings.worker_concurrency, models=[model])
    extra = {"NEXUS_WORKER_INSTANCE_ID": str(instance["id"]), "NEXUS_WORKER_POOL": "threads", "HF_HUB_OFFLINE": "1"}
    if concurrency is not None:
        extra.update(NEXUS_INFERENCE_CONCURRENCY=str(concurrency), NEXUS_WORKER_CONCURRENCY=str(concurrency))
    return ChildSpec(name=name, argv=tuple(argv), env=_node_env(base_env, node_id, node_name, gpus, **extra))
