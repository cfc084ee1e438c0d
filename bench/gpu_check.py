"""What Nexus does on a real GPU, in one prepared run of under five minutes.

    python bench/gpu_check.py [--seconds-per-step 20] [--json out.json] [--cpu-too]

Meant for a machine with an NVIDIA GPU, torch (CUDA build), transformers and
nvidia-ml-py, and nothing else: no vLLM, no network, no PostgreSQL/Redis/S3. It
checks, with Nexus's own code and no cluster around it:

1. **Detection and tiering**: `NvmlDetector` (pynvml) reads the GPUs, and
   `classify_node` with the default thresholds names the node's tier (an H100 or
   H200 must come out `ai_factory`).
2. **The transformers backend on CUDA**: the tiny model (made here, as the tests
   make it) served by `TransformersBackend(device="cuda")`; tok/s at 1 and at 64
   requests in flight, each run for a fixed time (--seconds-per-step).
3. **Proof-of-compute on CUDA vs CPU**: nonces/s of the `standard` preset's
   distances (`nexus.proofs.compute.distances`) on the GPU and on one CPU core,
   and the GPU's distances checked against the CPU's for the same nonces (the
   verifier recomputes on whatever device it has, so they must agree within the
   receipts' tolerance).

Nexus's other imports (pydantic-settings for the thresholds' defaults, psutil for
host facts) are small pure-Python or manylinux wheels: on a machine without them
and without network, fetch them here with
`pip download -d .whl pydantic-settings psutil sqlalchemy` and install there with
`pip install --no-index --find-links .whl pydantic-settings psutil sqlalchemy`
(the `device` tool carries `.whl`). Prints a table and, with --json, writes the
figures. Without a GPU it still runs every step it can on the CPU and says that
no GPU was found: that is how the tests keep it from rotting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "The cluster schedules jobs on"
PROOF_SEED = "gpu-check"
PROOF_NODE = "gpu-check-node"
DISTANCE_TOLERANCE = 1e-4  # float32 matmuls on different devices differ in the last bits


@dataclass
class Report:
    gpus: list[dict[str, Any]] = field(default_factory=list)
    tier: str = "cpu_only"
    serving: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> {"1": tok/s, "64": tok/s}
    proof_nonces_per_second: dict[str, float] = field(default_factory=dict)  # device -> nonces/s
    proof_max_distance_gap: float | None = None
    notes: list[str] = field(default_factory=list)


def detect(report: Report) -> None:
    from nexus.agent.detect import NvmlDetector
    from nexus.config import Settings
    from nexus.nodes.tiers import TierThresholds, classify_node

    detector = NvmlDetector(disk_path=Path(tempfile.gettempdir()))
    try:
        hardware = detector.detect()
    finally:
        detector.close()
    report.gpus = [{"name": g.name, "memory_total_mb": g.memory_total_mb, "compute_capability": g.compute_capability}
                   for g in hardware.gpus]
    report.tier = classify_node(hardware, TierThresholds.from_settings(Settings())).value
    if not hardware.gpus:
        report.notes.append("NVML found no GPU: the serving and proof steps ran on the CPU only")


def serving_rate(model_dir: Path, device: str, in_flight: int, seconds: float, max_tokens: int = 64) -> float:
    """Completion tokens per second with `in_flight` requests kept going for about `seconds`."""
    from nexus.inference.types import GenerationRequest, SamplingParams
    from nexus.serving.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(model_dir, device=device, max_batch_size=max(8, in_flight))
    request = GenerationRequest(prompt=PROMPT, params=SamplingParams(max_tokens=max_tokens, temperature=0))
    try:
        backend.generate(request)  # warm up: CUDA context, kernels, the tokenizer
        deadline = time.perf_counter() + seconds

        def keep_going(_: int) -> int:
            tokens = 0
            while time.perf_counter() < deadline:
                tokens += backend.generate(request).usage.completion_tokens
            return tokens

        started = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            tokens = sum(pool.map(keep_going, range(in_flight)))
        return tokens / (time.perf_counter() - started)
    finally:
        backend.close()


def proof_rate(device_name: str, nonces: int):
    """(nonces/s, distances) of the standard preset on one device."""
    import torch

    from nexus.proofs.compute import distances
    from nexus.proofs.poc import PRESETS

    parameters = PRESETS["standard"].parameters
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    distances(PROOF_SEED, parameters, PROOF_NODE, list(range(min(nonces, 16))), device=device)  # warm up
    started = time.perf_counter()
    values = distances(PROOF_SEED, parameters, PROOF_NODE, list(range(nonces)), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return nonces / (time.perf_counter() - started), values


def run(seconds: float, cpu_too: bool, gpu_nonces: int, cpu_nonces: int) -> Report:
    import torch

    from nexus.serving.tiny import make_tiny_model

    report = Report()
    detect(report)
    cuda = torch.cuda.is_available()
    devices = (["cuda"] if cuda else []) + (["cpu"] if cpu_too or not cuda else [])
    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_tiny_model(Path(folder) / "tiny")
        for device in devices:
            report.serving[device] = {str(n): round(serving_rate(model_dir, device, n, seconds), 1) for n in (1, 64)}
    if cuda:
        rate, on_gpu = proof_rate("cuda", gpu_nonces)
        report.proof_nonces_per_second["cuda"] = round(rate, 1)
    rate, on_cpu = proof_rate("cpu", cpu_nonces)
    report.proof_nonces_per_second["cpu"] = round(rate, 1)
    if cuda:
        shared = min(len(on_gpu), len(on_cpu))
        report.proof_max_distance_gap = float(abs(on_gpu[:shared] - on_cpu[:shared]).max())
        if report.proof_max_distance_gap > DISTANCE_TOLERANCE:
            report.notes.append(f"GPU and CPU distances differ by {report.proof_max_distance_gap:.2e}, "
                                f"over the tolerance {DISTANCE_TOLERANCE}")
    return report


def print_report(report: Report) -> None:
    for gpu in report.gpus:
        print(f"gpu: {gpu['name']}, {gpu['memory_total_mb']} MiB, compute {gpu['compute_capability']}")
    print(f"tier: {report.tier}")
    for device, rates in report.serving.items():
        print(f"transformers backend on {device}: " + ", ".join(f"{n} in flight {r} tok/s" for n, r in rates.items()))
    for device, rate in report.proof_nonces_per_second.items():
        print(f"proof (standard preset) on {device}: {rate} nonces/s")
    if {"cuda", "cpu"} <= report.proof_nonces_per_second.keys():
        speedup = report.proof_nonces_per_second["cuda"] / report.proof_nonces_per_second["cpu"]
        print(f"proof speed-up cuda/cpu (one core): {speedup:.0f}x; "
              f"largest distance gap {report.proof_max_distance_gap:.2e}")
    for note in report.notes:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds-per-step", type=float, default=20.0, help="length of each tok/s measurement")
    parser.add_argument("--gpu-nonces", type=int, default=16384)
    parser.add_argument("--cpu-nonces", type=int, default=64)
    parser.add_argument("--cpu-too", action="store_true", help="also measure the serving steps on the CPU")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    report = run(args.seconds_per_step, args.cpu_too, args.gpu_nonces, args.cpu_nonces)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
