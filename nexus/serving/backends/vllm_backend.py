"""vLLM as a supervised `vllm serve` subprocess per model instance (docs/ARCHITECTURE.md, "No CUDA fork").

The server has its own CUDA context and continuous batching; Nexus never
imports vllm (it is the optional `gpu` extra), it runs the command and talks
to it over loopback HTTP through the OpenAI backend, with many requests in
flight. The command line is a pure function of a `VllmLaunch`, so each
parallelism plan's flags are tested without a GPU.

The supervisor restarts a server that exits or stops answering /health, with
exponential backoff, and stops it with SIGTERM then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import requests

from nexus.inference.capabilities import Capabilities
from nexus.serving.backends.openai_backend import OpenAIBackend
from nexus.serving.ray_probe import wait_for_nodes
from nexus.models.placement import ParallelismPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmLaunch:
    """Everything `vllm serve` needs for one instance on this node."""

    model_path: str
    served_model_name: str
    port: int
    gpus: tuple[int, ...] = (0,)  # this node's GPUs, NVML (PCI bus) order
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None
    multi_node: bool = False  # stages on other nodes join through a Ray cluster
    ray_nodes: int = 1  # the members of that cluster, this node included
    host: str = "127.0.0.1"  # loopback: only this node's worker talks to it
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()  # from the model's catalog entry

    @classmethod
    def from_plan(cls, plan: ParallelismPlan, model_path: str, served_model_name: str, port: int,
                  max_model_len: int | None = None, extra_args: Sequence[str] = ()) -> "VllmLaunch":
        head = plan.head
        return cls(model_path=model_path, served_model_name=served_model_name, port=port,
                   gpus=head.gpus if head else (0,), tensor_parallel_size=plan.tensor_parallel_size,
                   pipeline_parallel_size=plan.pipeline_parallel_size,
                   gpu_memory_utilization=plan.gpu_memory_utilization, max_model_len=max_model_len,
                   multi_node=plan.multi_node, ray_nodes=len(plan.node_ids), extra_args=tuple(extra_args))

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_command(launch: VllmLaunch, executable: str = "vllm") -> list[str]:
    """The `vllm serve` command line for one instance."""
    argv = [
        executable, "serve", launch.model_path,
        "--served-model-name", launch.served_model_name,
        "--host", launch.host,
        "--port", str(launch.port),
        "--tensor-parallel-size", str(launch.tensor_parallel_size),
        "--pipeline-parallel-size", str(launch.pipeline_parallel_size),
        "--gpu-memory-utilization", f"{launch.gpu_memory_utilization:.2f}",
        # Multiprocessing on one node; across nodes vLLM places its workers through Ray.
        "--distributed-executor-backend", "ray" if launch.multi_node else "mp",
    ]
    if launch.max_model_len:
        argv += ["--max-model-len", str(launch.max_model_len)]
    if launch.api_key:
        argv += ["--api-key", launch.api_key]
    return argv + list(launch.extra_args)


# What `vllm serve` inherits from the worker: what finding its libraries, its GPUs, its caches and its peers
# needs, nothing else. Never NEXUS_* (the worker's database URL, broker and object-store keys): a
# model's code runs in this process (`--trust-remote-code`), so it gets no credential of the cluster.
_VLLM_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM", "SHELL",
                             "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "XDG_CACHE_HOME",
                             "HF_HOME", "OMP_NUM_THREADS"})
_VLLM_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "VLLM_", "TORCH", "TRITON_", "RAY_", "GLOO_")


def vllm_env(base_env: Mapping[str, str], launch: VllmLaunch) -> dict[str, str]:
    """The server's environment: a minimal one (no credential), only its GPUs, in the order NVML numbers
    them, and no hub access."""
    local_gpus = launch.gpus if launch.multi_node else launch.gpus[:launch.tensor_parallel_size
                                                                    * launch.pipeline_parallel_size]
    env = {name: value for name, value in base_env.items()
           if name in _VLLM_ENV_NAMES or name.startswith(_VLLM_ENV_PREFIXES)}
    env.update(
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        CUDA_VISIBLE_DEVICES=",".join(str(g) for g in local_gpus),
        HF_HUB_OFFLINE="1",  # weights come from the object store or a local path, never a hub
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@dataclass
class Backoff:
    base_seconds: float = 1.0
    max_seconds: float = 60.0
    reset_after_seconds: float = 300.0  # a server up this long was healthy; start the backoff over

    def delay(self, consecutive_failures: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2 ** max(0, consecutive_failures - 1))


class ServerStartError(RuntimeError):
    pass


@dataclass
class VllmServer:
    """Runs, health-checks, restarts and stops one `vllm serve` process."""

    launch: VllmLaunch
    executable: str = "vllm"
    backoff: Backoff = field(default_factory=Backoff)
    check_interval_seconds: float = 5.0
    log_path: str | None = None
    _process: subprocess.Popen | None = field(default=None, init=False)
    _failures: int = field(default=0, init=False)
    _started_at: float = field(default=0.0, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self, startup_timeout_seconds: float) -> None:
        """Start the server and wait for /health; then keep it alive in a background thread.

        Across nodes, first wait until every member has joined the instance's Ray cluster (the agent
        starts this node's Ray head beside this worker, the members join it): vLLM's placement group
        then finds every GPU it asks for."""
        if self.launch.multi_node:
            wait_for_nodes(_ray_address(), self.launch.ray_nodes, startup_timeout_seconds)
        self._spawn()
        if not self.wait_healthy(startup_timeout_seconds):
            self.stop()
            raise ServerStartError(f"vllm serve did not become healthy in {startup_timeout_seconds:.0f} s "
                                   f"(log: {self.log_path or 'inherited'})")
        self._thread = threading.Thread(target=self._watch, name=f"vllm-{self.launch.port}", daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            return False
        try:
            return requests.get(self.launch.base_url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._process.poll() is not None:
                return False
            if self.healthy():
                return True
            time.sleep(1.0)
        return False

    def stop(self, grace_seconds: float = 30.0) -> None:
        self._stop.set()
        process = self._process
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(10)

    def _spawn(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self._process = subprocess.Popen(vllm_command(self.launch, self.executable),
                                             env=vllm_env(os.environ, self.launch), stdout=out,
                                             stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                                             start_new_session=True)  # its engine processes die with it
        finally:
            if out:
                out.close()
        self._started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.check_interval_seconds):
            if self.healthy():
                if time.monotonic() - self._started_at > self.backoff.reset_after_seconds:
                    self._failures = 0
                continue
            self._failures += 1
            delay = self.backoff.delay(self._failures)
            log.warning("vllm server on port %s unhealthy (failure %s); restarting in %.0f s",
                        self.launch.port, self._failures, delay)
            self.stop_process_only()
            if self._stop.wait(delay):
                return
            self._spawn()

    def stop_process_only(self) -> None:
        if self._process is not None and self._process.poll() is None:
            _signal_group(self._process, signal.SIGTERM)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                _signal_group(self._process, signal.SIGKILL)
                self._process.wait(10)


def _ray_address() -> str:
    # Set by the agent for the head's serving worker (nexus.agent.ray_node); vLLM's ray.init reads it too.
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ServerStartError("a plan across nodes needs RAY_ADDRESS (the agent sets it for the head's worker)")
    return address


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


class VllmBackend(OpenAIBackend):
    """The OpenAI backend pointed at a vLLM server this backend owns."""

    capabilities = Capabilities("vllm", passthrough=True)

    def __init__(self, launch: VllmLaunch, executable: str = "vllm", startup_timeout_seconds: float = 900.0,
                 max_connections: int = 256, log_path: str | None = None) -> None:
        self.server = VllmServer(launch, executable, log_path=log_path)
        self.server.start(startup_timeout_seconds)
        super().__init__(launch.base_url + "/v1", launch.served_model_name, api_key=launch.api_key,
                         max_connections=max_connections)

    def healthy(self) -> bool:
        return self.server.healthy()

    def close(self) -> None:
        super().close()
        self.server.stop()
