"""Streams under concurrency for bench/inference.py: the in-flight sweep and the idle-streams hold.

sweep          at each level, `level` streams in flight through the bare backend and through
               /v1/completions (stream=true): tok/s, the ratio, time to first token p50/p99
idle_streams   N streams held open through one API process against a trickling upstream:
               the API's RSS and CPU, streams answered, /healthz latency meanwhile
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from bench.common import percentile
from nexus.inference.types import GenerationRequest, SamplingParams, StreamDelta, Usage


def bare_stream(backend, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one request on the bare backend."""
    started, first, tokens = time.perf_counter(), None, 0
    request = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0))
    for event in backend.stream(request):
        if isinstance(event, StreamDelta) and event.text and first is None:
            first = time.perf_counter() - started
        elif isinstance(event, Usage):
            tokens = event.completion_tokens
    return first or 0.0, tokens


def nexus_stream(url: str, token: str, model: str, prompt: str, max_tokens: int, timeout: float = 900,
                 ) -> tuple[float, int]:
    """The same through /v1/completions with stream=true, read as server-sent events."""
    target = urlparse(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    started, first, tokens = time.perf_counter(), None, 0
    try:
        conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {token}",
                                                       "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    return first or 0.0, tokens


def run_level(one, items: list[str], level: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        results = list(pool.map(one, items))
    seconds = time.perf_counter() - started
    ttfts = [r[0] for r in results]
    return {"seconds": seconds, "tokens": sum(r[1] for r in results), "ttft_p50": percentile(ttfts, 50),
            "ttft_p99": percentile(ttfts, 99), "requests": len(results)}


def sweep(backend, url: str, token: str, model: str, levels: list[int], min_requests: int, max_tokens: int,
          rounds: int, prompts) -> dict[int, tuple[dict, dict]]:
    """Per level, bare and Nexus alternating `rounds` times; each side keeps its fastest run."""
    out = {}
    for level in levels:
        items = prompts(max(level, min_requests))
        best: list[dict | None] = [None, None]
        for _ in range(rounds):
            for side, one in enumerate((lambda p: bare_stream(backend, p, max_tokens),
                                        lambda p: nexus_stream(url, token, model, p, max_tokens))):
                result = run_level(one, items, level)
                if best[side] is None or result["seconds"] < best[side]["seconds"]:
                    best[side] = result
        out[level] = (best[0], best[1])
        print(f"  level {level} done", file=sys.stderr, flush=True)
    return out


def report_sweep(results: dict[int, tuple[dict, dict]]) -> None:
    print(f"{'in flight':>9}{'reqs':>6}{'bare tok/s':>12}{'nexus tok/s':>13}{'ratio':>8}"
          f"{'bare TTFT p50/p99 ms':>24}{'nexus TTFT p50/p99 ms':>25}")
    for level, (bare, nexus) in results.items():
        b, n = bare["tokens"] / bare["seconds"], nexus["tokens"] / nexus["seconds"]
        print(f"{level:>9}{bare['requests']:>6}{b:>12.1f}{n:>13.1f}{n / b:>8.3f}"
              f"{bare['ttft_p50'] * 1000:>13.1f} / {bare['ttft_p99'] * 1000:<9.1f}"
              f"{nexus['ttft_p50'] * 1000:>13.1f} / {nexus['ttft_p99'] * 1000:<9.1f}")


# --- idle streams ------------------------------------------------------------------------------

JOIN_TOKEN = "nxj_bench-join-token"
BEATING_NODES = 20


def idle_streams(count: int, seconds: float, gap: float) -> None:
    import psutil
    import requests

    from bench.common import bench_cluster
    from nexus.localservers import free_port
    from nexus.models import catalog, liveness
    from nexus.models.catalog import BackendKind, ModelSpec
    from nexus.services import Services
    from tests.support import start_api, start_worker, wait_for

    model, upstream_port = "trickle", free_port()
    # One token opens all the streams: its per-token /v1 slots must not be what is measured.
    with bench_cluster(inference_admission_wait_seconds=120, inference_request_timeout_seconds=seconds + 120,
                       inference_stream_interval_ms=50, max_streams_per_token=count + 16,
                       join_token=JOIN_TOKEN) as (settings, folder):
        upstream = _start_upstream(upstream_port, gap, seconds)
        with Services(settings).engine.begin() as conn:
            catalog.insert_model(conn, ModelSpec(model, "", BackendKind.OPENAI,
                                                 {"url": f"http://127.0.0.1:{upstream_port}/v1"}))
        api, url = start_api(settings, folder)
        per_worker = min(1024, -(-count // 2))  # two serving workers hold the upstream calls (threads pool)
        workers = [start_worker(settings, folder, name=f"trickle-{i}", extra_args=["--model", model],
                                extra_env={"NEXUS_INFERENCE_CONCURRENCY": str(per_worker)}) for i in range(2)]
        try:
            wait_for(lambda: len(liveness.live_instances(Services(settings).redis, model)) == 2, what="two instances")
            api_procs = [psutil.Process(api.process.pid), *psutil.Process(api.process.pid).children(recursive=True)]
            rss_before = sum(p.memory_info().rss for p in api_procs)
            cpu_before = sum(sum(p.cpu_times()[:2]) for p in api_procs)
            answered, finished, errors, lock = [0], [0], [], threading.Lock()

            def one() -> None:
                try:
                    first, _ = nexus_stream(url, settings.admin_token, model, "hold", 1_000_000, timeout=seconds + 180)
                    with lock:
                        finished[0] += 1
                except Exception as exc:  # counted and shown: nothing dropped silently
                    with lock:
                        errors.append(repr(exc)[:200])

            # Nodes beating every second on the node API meanwhile: what the crowd costs the cluster's liveness.
            # From a process of their own, as a node's agent would: among this process's 2,000 client
            # threads a beat's own thread waited for the GIL (p50 25 ms; 4-8 ms from its own process).
            # Registered before the streams open, so the opening burst is among what they measure; they
            # beat for about as long as the streams take (seconds + 14-16 s here).
            spawn = multiprocessing.get_context("spawn")
            beats = spawn.Queue()
            beater = spawn.Process(target=_beat_meanwhile, args=(settings, seconds + 15, beats), daemon=True)
            beater.start()
            assert beats.get(timeout=60) == "registered"
            threading.stack_size(256 * 1024)
            started = time.monotonic()
            threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
            for t in threads:
                t.start()
            health, health_failures, rss_peak, slowest = [], [], 0, (0.0, "")
            while time.monotonic() - started < seconds + 60 and (finished[0] + len(errors)) < count:
                t0 = time.perf_counter()
                try:
                    probe = requests.get(url + "/healthz", timeout=10)
                    status = probe.status_code
                except requests.RequestException as exc:
                    status, probe = repr(exc)[:200], None
                health.append(time.perf_counter() - t0)
                if probe is not None and health[-1] > slowest[0]:
                    slowest = (health[-1], _dependency_times(probe))
                if status != 200:
                    health_failures.append(status)
                answered[0] = _open_streams(Services(settings), model)
                rss_peak = max(rss_peak, sum(p.memory_info().rss for p in api_procs))
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            cpu = sum(sum(p.cpu_times()[:2]) for p in api_procs) - cpu_before
            beat_result = beats.get(timeout=seconds + 60)
            beater.join(10)
        finally:
            for worker in workers:
                worker.stop()
            api.stop()
            upstream.terminate()
            import shutil

            shutil.copy(folder / "api.log", "/tmp/nexus-bench-idle-api.log")  # the temporary folder goes away
        print(f"{count} streams, each {seconds:g} s with a token every {gap:g} s, one API process (gevent)")
        print(f"  finished {finished[0]}, errors {len(errors)}{(' e.g. ' + errors[0]) if errors else ''}")
        print(f"  API RSS {rss_before / 2**20:.0f} MiB at rest, {rss_peak / 2**20:.0f} MiB peak "
              f"({(rss_peak - rss_before) / max(1, count) / 1024:.1f} KiB per stream)")
        print(f"  API CPU {cpu:.1f} s over {elapsed:.0f} s ({cpu / elapsed * 100:.0f}% of a core)")
        print(f"  /healthz meanwhile: p50 {percentile(health, 50) * 1000:.0f} ms, max {max(health) * 1000:.0f} ms "
              f"({len(health)} probes, {len(health_failures)} not 200)", *health_failures[:1])
        print(f"  the slowest /healthz's own checks: {slowest[1]}")
        if beat_result:
            latencies, beat_errors = beat_result
            print(f"  heartbeats meanwhile ({BEATING_NODES} nodes, every 1 s): p50 {percentile(latencies, 50) * 1000:.1f} ms, "
                  f"p99 {percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms "
                  f"({len(latencies)} beats, {len(beat_errors)} not 200)")


def _beat_meanwhile(settings, seconds: float, results) -> None:
    """BEATING_NODES nodes register ("registered" on `results`), then beat every second for `seconds`;
    then (latencies, errors) on `results`."""
    from bench.heartbeat import beat_for, register_all

    nodes = register_all(settings, BEATING_NODES)
    results.put("registered")
    latencies, _, errors, _ = beat_for(nodes, settings, 1.0, seconds)
    results.put((latencies, errors))


def _dependency_times(probe) -> str:
    """What /healthz measured of each dependency itself: the rest of its time was the API's queue."""
    try:
        report = probe.json()["dependencies"]
    except (ValueError, KeyError):
        return "(no report)"
    return ", ".join(f"{name} {check.get('latency_ms', 'failed')} ms" for name, check in report.items())


def _open_streams(services, model: str) -> int:
    from nexus.models.admission import INFLIGHT_KEY

    return int(services.redis.zcard(INFLIGHT_KEY.format(model=model)))


def _start_upstream(port: int, gap: float, seconds: float):
    import subprocess

    code = f"""
from gevent import monkey; monkey.patch_all()
import json, time
from gevent.pywsgi import WSGIServer
def app(environ, start):
    if environ["PATH_INFO"].endswith("/models"):
        start("200 OK", [("Content-Type", "application/json")]); return [b'{{"data": []}}']
    start("200 OK", [("Content-Type", "text/event-stream")])
    def gen():
        n, end = 0, time.monotonic() + {seconds}
        while True:
            n += 1
            last = time.monotonic() >= end
            choice = {{"index": 0, "text": "tok ", "finish_reason": "length" if last else None}}
            yield ("data: " + json.dumps({{"choices": [choice]}}) + "\\n\\n").encode()
            if last:
                break
            time.sleep({gap})
        usage = {{"prompt_tokens": 1, "completion_tokens": n}}
        yield ("data: " + json.dumps({{"choices": [], "usage": usage}}) + "\\n\\n").encode()
        yield b"data: [DONE]\\n\\n"
    return gen()
WSGIServer(("127.0.0.1", {port}), app, log=None).serve_forever()
"""
    return subprocess.Popen([sys.executable, "-c", code])
