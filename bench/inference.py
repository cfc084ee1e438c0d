"""Inference overhead: the same prompts through the bare transformers backend and through Nexus.

    python bench/inference.py [--prompts 24] [--max-tokens 256] [--concurrency 8]
    python bench/inference.py --sweep 1,8,64,256 [--max-tokens 128]   streams in flight: tok/s and TTFT
    python bench/inference.py --idle-streams 2000 [--idle-seconds 30]  open, mostly idle streams

Starts its own Redis, S3 and PostgreSQL database (bench/common.py), writes the
tiny model, then measures, on the same greedy prompts:

    single      one request at a time: the bare backend in this process, versus
                /v1/completions on the real API process with a real worker serving the model
    concurrent  `concurrency` requests in flight: the same two paths (the backend batches them)
    batch       `--batch-lines` prompts as one `inference` batch job (JSONL in, JSONL out, chunk
                jobs) versus the bare backend with as many in flight as a chunk keeps (16)

and prints completion tokens/s for each path and Nexus / bare (target >= 0.95).

`--sweep` instead streams at each level of requests in flight (max(level, --prompts)
requests per level): the bare backend's stream() in this process versus streaming
/v1/completions, tok/s with the ratio and time to first token p50/p99 for both.
`--idle-streams N` holds N streams open through one API process against an
OpenAI-compatible upstream that sends a token every --idle-gap seconds (two
serving workers relay it), and reports the API's memory and CPU, the streams
answered, /healthz latency and 20 nodes' heartbeat latency (every 1 s) meanwhile.
Bare and Nexus runs alternate, path by path, and each keeps its best of
`--rounds`, so load from elsewhere on the machine does not favour one side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.common import bench_cluster  # noqa: E402
from bench import inference_streams  # noqa: E402
from nexus.models import catalog, liveness  # noqa: E402
from nexus.models.catalog import ModelSpec  # noqa: E402
from nexus.inference.types import GenerationRequest, SamplingParams  # noqa: E402
from nexus.services import Services  # noqa: E402
from tests.support import start_api, start_worker, wait_for  # noqa: E402

MODEL = "tiny"
TOPICS = ["The cluster", "A job is a row", "Numbers: 1 2 3", "def add(a, b):", "Streaming sends", "Queues carry",
          "The quick brown fox", "Hello, world!", "Pipeline parallelism", "Workers claim jobs", "Model servers",
          "Batch inference splits"]


def prompts(count: int) -> list[str]:
    return [f"{TOPICS[i % len(TOPICS)]} ({i})" for i in range(count)]


def timed(fn, items, concurrency: int) -> tuple[float, int]:
    """(seconds, completion tokens) to run fn over items with `concurrency` in flight."""
    started = time.perf_counter()
    if concurrency == 1:
        tokens = [fn(item) for item in items]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = list(pool.map(fn, items))
    return time.perf_counter() - started, sum(tokens)


def bare_paths(backend, max_tokens: int, concurrency: int, batch_in_flight: int) -> dict:
    def one(prompt: str) -> int:
        request = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0))
        return backend.generate(request).usage.completion_tokens

    return {"single": lambda items: timed(one, items, 1), "concurrent": lambda items: timed(one, items, concurrency),
            "batch": lambda items: timed(one, items, batch_in_flight)}


def nexus_paths(url: str, token: str, max_tokens: int, concurrency: int) -> dict:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def one(prompt: str) -> int:
        response = session.post(url + "/v1/completions", timeout=300,
                                json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    return {"single": lambda items: timed(one, items, 1), "concurrent": lambda items: timed(one, items, concurrency),
            "batch": lambda items: batch_job(session, url, items, max_tokens)}


def best_of(rounds: int, bare: dict, nexus: dict, items: list[str], batch_items: list[str]) -> tuple[dict, dict]:
    """Alternate bare and Nexus runs and keep each one's fastest, so that load from elsewhere on
    the machine hits both sides alike. Single requests alternate prompt by prompt."""
    best_bare, best_nexus = {}, {}
    best_bare["single"], best_nexus["single"] = paired_single(rounds, bare["single"], nexus["single"], items)
    for _ in range(rounds):
        for name, lines in (("concurrent", items), ("batch", batch_items)):
            for paths, best in ((bare, best_bare), (nexus, best_nexus)):
                seconds, tokens = paths[name](lines)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tokens)
    return best_bare, best_nexus


def paired_single(rounds: int, bare_single, nexus_single, items: list[str]):
    """Per prompt, bare and Nexus in turn `rounds` times; (seconds, tokens) summed over each side's fastest."""
    bare_total, nexus_total = [0.0, 0], [0.0, 0]
    for prompt in items:
        bare_runs, nexus_runs = [], []
        for _ in range(rounds):
            bare_runs.append(bare_single([prompt]))
            nexus_runs.append(nexus_single([prompt]))
        for total, runs in ((bare_total, bare_runs), (nexus_total, nexus_runs)):
            seconds, tokens = min(runs)
            total[0] += seconds
            total[1] += tokens
    return tuple(bare_total), tuple(nexus_total)


def batch_job(session: requests.Session, url: str, items: list[str], max_tokens: int) -> tuple[float, int]:
    """Submission to final result of one `inference` job over all prompts."""
    lines = "\n".join(json.dumps({"custom_id": str(i), "url": "/v1/completions",
                                  "body": {"prompt": p, "max_tokens": max_tokens, "temperature": 0}})
                      for i, p in enumerate(items)).encode()
    started = time.perf_counter()
    key = session.post(url + "/api/v1/inputs", params={"name": "bench.jsonl"}, data=lines, timeout=30).json()["key"]
    job = session.post(url + "/api/v1/jobs", timeout=30, json={
        "type": "inference", "input_key": key, "requirements": {"model": MODEL},
        "payload": {"model": MODEL}}).json()
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        job = session.get(f"{url}/api/v1/jobs/{job['id']}", params={"wait": 5}, timeout=30).json()
    seconds = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise RuntimeError(f"batch job {job['state']}: {job['error']}")
    results = [json.loads(line) for line in requests.get(job["output_url"], timeout=30).text.splitlines()]
    return seconds, sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)


def report(bare: dict, nexus: dict) -> None:
    print(f"{'path':<12}{'bare tok/s':>12}{'nexus tok/s':>13}{'ratio':>8}   tokens (bare / nexus)")
    for name in ("single", "concurrent", "batch"):
        (b_s, b_t), (n_s, n_t) = bare[name], nexus[name]
        print(f"{name:<12}{b_t / b_s:>12.1f}{n_t / n_s:>13.1f}{(n_t / n_s) / (b_t / b_s):>8.3f}   {b_t} / {n_t}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-lines", type=int, default=96, help="lines of the batch path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--sweep", default="", help="comma-separated levels of streams in flight, e.g. 1,8,64,256")
    parser.add_argument("--idle-streams", type=int, default=0, help="hold this many mostly idle streams open")
    parser.add_argument("--idle-seconds", type=float, default=30, help="how long each idle stream lasts")
    parser.add_argument("--idle-gap", type=float, default=5, help="seconds between an idle stream's tokens")
    args = parser.parse_args()
    if args.idle_streams:
        return inference_streams.idle_streams(args.idle_streams, args.idle_seconds, args.idle_gap)
    items = prompts(args.prompts)
    # Requests beyond the serving slots wait for one at the API: long enough for the deepest sweep level.
    # One token sends every request: the per-token /v1 slots (128) must not cap the 256 level.
    with bench_cluster(inference_admission_wait_seconds=900, max_streams_per_token=1024,
                       ) as (settings, folder):
        from nexus.serving.backends.transformers_backend import TransformersBackend
        from nexus.serving.tiny import make_tiny_model

        model_dir = make_tiny_model(folder / "tiny")
        services = Services(settings)
        with services.engine.begin() as conn:
            catalog.insert_model(conn, ModelSpec(MODEL, str(model_dir), max_model_len=512))
        api, url = start_api(settings, folder)
        worker = start_worker(settings, folder, name="bench-model-worker", extra_args=["--model", MODEL],
                              extra_env={"HF_HUB_OFFLINE": "1",
                                         "NEXUS_INFERENCE_TORCH_THREADS": str(args.torch_threads)})
        backend = TransformersBackend(model_dir, max_batch_size=settings.inference_max_batch_size,
                                      batch_window_ms=settings.inference_batch_window_ms,
                                      torch_threads=args.torch_threads)
        try:
            wait_for(lambda: liveness.live_instances(services.redis, MODEL), what="the model serving")
            # A batch chunk keeps inference_concurrency lines in flight; the bare baseline gets the same.
            bare = bare_paths(backend, args.max_tokens, args.concurrency, settings.inference_concurrency)
            nexus = nexus_paths(url, settings.admin_token, args.max_tokens, args.concurrency)
            for paths in (bare, nexus):  # warm up both
                paths["single"](items[:1])
            if args.sweep:
                levels = [int(x) for x in args.sweep.split(",") if x.strip()]
                results = inference_streams.sweep(backend, url, settings.admin_token, MODEL, levels, args.prompts,
                                                  args.max_tokens, args.rounds, prompts)
                print(f"streaming sweep, max_tokens {args.max_tokens}, greedy, torch threads {args.torch_threads}, "
                      f"best of {args.rounds}")
                inference_streams.report_sweep(results)
                return
            best_bare, best_nexus = best_of(args.rounds, bare, nexus, items, prompts(args.batch_lines))
        finally:
            backend.close()
            worker.stop()
            api.stop()
        print(f"{args.prompts} prompts ({args.batch_lines} batch lines), max_tokens {args.max_tokens}, greedy, "
              f"concurrency {args.concurrency}, "
              f"torch threads {args.torch_threads}, best of {args.rounds} alternating rounds")
        report(best_bare, best_nexus)


if __name__ == "__main__":
    main()
