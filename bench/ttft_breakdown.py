"""Where a /v1 stream's time to first token goes, hop by hop, on a real API and worker.

    python bench/ttft_breakdown.py [--requests 30] [--max-tokens 4] [--in-flight 1]

Streams one request at a time (or `--in-flight` at once) through the real gunicorn API to a real worker
serving the tiny model, and splits each request's time to first token with
three clocks of the same machine: the job row's `created_at` (the submitting
transaction's start, after auth, the stream slot, admission and parsing) and
`started_at` (the worker's claim), the moments Redis executed the `LPUSH` of the job's
message and the first `XADD` to
the request's stream (from a `MONITOR` connection, which costs Redis a little on
every command: both sides of the comparison pay it), and the client's first SSE
data line. The bare engine's TTFT for the same prompt (TransformersBackend in
this process) is printed beside it, so the last hop's overhead reads directly.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.common import bench_cluster  # noqa: E402
from nexus.inference.streams import STREAM_KEY  # noqa: E402
from nexus.inference.types import GenerationRequest, SamplingParams, StreamDelta  # noqa: E402
from nexus.models import catalog, liveness  # noqa: E402
from nexus.models.catalog import ModelSpec  # noqa: E402
from nexus.services import Services  # noqa: E402
from tests.support import start_api, start_worker, wait_for  # noqa: E402

MODEL = "tiny"
PROMPT = "Hello there"
STREAM_PREFIX = STREAM_KEY.split("{")[0]
JOB_IN_ENVELOPE = re.compile(r"argsrepr[^0-9a-f]+([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
HOPS = ("client -> job row (auth, slots, admission, insert)", "row -> message (commit, publish)",
        "message -> worker claim (delivery, Celery, claim)",
        "claim -> first XADD (handler, engine's first step)", "first XADD -> client (relay, SSE)", "total TTFT")


class FirstWrites:
    """Redis's own time of the first XADD to each generation stream, and of the LPUSH of each job's
    message (its envelope's `argsrepr` names the job), read from MONITOR."""

    def __init__(self, url: str) -> None:
        self.times: dict[str, float] = {}
        self.pushes: dict[str, float] = {}
        self._client = redis.Redis.from_url(url)
        self._monitor = self._client.monitor().__enter__()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        with contextlib.suppress(redis.ConnectionError, ValueError):  # closed by close()
            for command in self._monitor.listen():
                words = command["command"].split()
                if words[:1] == ["XADD"] and words[1].startswith(STREAM_PREFIX):
                    self.times.setdefault(words[1][len(STREAM_PREFIX):], command["time"])
                elif words[:1] == ["LPUSH"] and (job := JOB_IN_ENVELOPE.search(command["command"])):
                    self.pushes.setdefault(job.group(1), command["time"])

    def close(self) -> None:
        with contextlib.suppress(redis.ConnectionError):
            self._monitor.__exit__(None, None, None)
        self._client.close()


def stream_once(session: requests.Session, url: str, max_tokens: int, prompt: str = PROMPT) -> tuple[float, float]:
    started = time.time()
    response = session.post(url + "/v1/completions", stream=True, timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    response.raise_for_status()
    first = None
    for line in response.iter_lines():
        if first is None and line.startswith(b"data:"):
            first = time.time()
    return started, first


def bare_ttft(model_dir: Path, max_tokens: int, count: int) -> float:
    from nexus.serving.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(model_dir, torch_threads=1)
    request = GenerationRequest(prompt=PROMPT, params=SamplingParams(max_tokens=max_tokens, temperature=0))
    try:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            stream = backend.stream(request)
            next(event for event in stream if isinstance(event, StreamDelta))
            times.append(time.perf_counter() - started)
            stream.close()
        return statistics.median(times[count // 5:]) * 1000
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=1, help="streams at once (each its own prompt)")
    args = parser.parse_args()
    with bench_cluster(inference_admission_wait_seconds=60) as (settings, folder):
        from nexus.serving.tiny import make_tiny_model

        model_dir = make_tiny_model(folder / "tiny")
        services = Services(settings)
        with services.engine.begin() as conn:
            catalog.insert_model(conn, ModelSpec(MODEL, str(model_dir), max_model_len=512))
        api, url = start_api(settings, folder)
        worker = start_worker(settings, folder, name="ttft-worker", extra_args=["--model", MODEL],
                              extra_env={"HF_HUB_OFFLINE": "1", "NEXUS_INFERENCE_TORCH_THREADS": "1"})
        writes = FirstWrites(settings.redis_url)
        try:
            wait_for(lambda: liveness.live_instances(services.redis, MODEL), what="the model serving")
            sessions = threading.local()

            def one(index: int) -> tuple[float, float]:
                if not hasattr(sessions, "session"):
                    sessions.session = requests.Session()
                    sessions.session.headers["Authorization"] = f"Bearer {settings.admin_token}"
                prompt = PROMPT if args.in_flight == 1 else f"{PROMPT} ({index})"
                return stream_once(sessions.session, url, args.max_tokens, prompt)

            with ThreadPoolExecutor(args.in_flight) as pool:
                client = list(pool.map(one, range(args.requests)))
            time.sleep(0.5)  # the monitor's last lines
            with services.engine.connect() as conn:
                rows = conn.execute(text("SELECT id, created_at, started_at FROM jobs WHERE type = 'completion' "
                                         "ORDER BY created_at")).all()
                by_prompt = dict(conn.execute(text("SELECT payload->'body'->>'prompt', id FROM jobs "
                                                   "WHERE type = 'completion'")).all())
            if args.in_flight > 1:  # the requests' rows, in the order of `client`
                order = {row.id: row for row in rows}
                rows = [order[by_prompt[f"{PROMPT} ({i})"]] for i in range(args.requests)]
            bare = bare_ttft(model_dir, args.max_tokens, args.requests)
        finally:
            writes.close()
            worker.stop()
            api.stop()
    spans = []
    for (sent, first), row in list(zip(client, rows))[args.requests // 5:]:  # the first fifth warms up
        created, claimed, xadd = row.created_at.timestamp(), row.started_at.timestamp(), writes.times[str(row.id)]
        pushed = writes.pushes[str(row.id)]
        spans.append((created - sent, pushed - created, claimed - pushed, xadd - claimed, first - xadd, first - sent))
    print(f"{len(spans)} streams, {args.in_flight} in flight, max_tokens {args.max_tokens}; p50 per hop:")
    for index, hop in enumerate(HOPS):
        print(f"  {hop:<52} {statistics.median(s[index] for s in spans) * 1000:7.1f} ms")
    print(f"  {'bare engine TTFT (same prompt, in process)':<52} {bare:7.1f} ms")


if __name__ == "__main__":
    main()
