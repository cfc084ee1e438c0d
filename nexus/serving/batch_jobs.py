"""Batch inference as a job tree: `inference` splits, `inference_chunk` children generate, the parent merges.

    inference(payload {model, requests? , chunk_lines?}, input_key = a JSONL upload)
      ├─ writes each chunk of lines to the outputs bucket and submits one
      │  `inference_chunk` per chunk on the model's queue (idempotent per chunk,
      │  so a retried parent finds its children instead of doubling them)
      ├─ waits, keeping its progress at the number of lines done
      └─ merges the chunks' results in input order into results.jsonl

A line that cannot be served (bad body, too long) gets an error line; a chunk
whose job fails after its retries gets error lines for each of its lines.
Submit the parent with requirements {"model": M} to run it on a worker serving M.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from nexus.serving import host as serving
from nexus.serving.batch import (BatchLine, chunk_ranges, error_line, failed_chunk_lines, parse_line, split_lines,
                                   success_line, to_jsonl)
from nexus.models.catalog import MODEL_NAME_PATTERN
from nexus.inference.openai_shapes import OpenAIError, build_response
from nexus.jobs.context import JobContext
from nexus.jobs.fanout import check_fan_out
from nexus.jobs.records import Job
from nexus.jobs.registry import JobType

RESULTS_NAME = "results.jsonl"
MAX_INLINE_REQUESTS = 10_000
FINAL = ("succeeded", "failed", "cancelled")
POLL_SECONDS = 1.0  # how often the parent reads its chunks when no chunk's notice wakes it sooner


def _check_model(payload: Any) -> str:
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not re.match(MODEL_NAME_PATTERN, model):
        raise ValueError("payload.model must name a catalog model")
    return model


def validate_batch(payload: Any) -> dict:
    model = _check_model(payload)
    unknown = set(payload) - {"model", "requests", "chunk_lines"}
    if unknown:
        raise ValueError(f"unknown payload fields: {sorted(unknown)}; allowed: model, requests, chunk_lines")
    requests = payload.get("requests")
    if requests is not None and (not isinstance(requests, list) or not 0 < len(requests) <= MAX_INLINE_REQUESTS):
        raise ValueError(f"payload.requests must be a list of 1 to {MAX_INLINE_REQUESTS} request objects "
                         "(or upload a JSONL file and pass its input_key)")
    chunk = payload.get("chunk_lines")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk <= 100_000):
        raise ValueError("payload.chunk_lines must be an integer between 1 and 100000")
    return {**payload, "model": model}


def batch_chunks(payload: dict, settings) -> int | None:
    """The number of chunk jobs, when the requests are inline (an input file is counted when it runs)."""
    requests = payload.get("requests")
    return -(-len(requests) // _chunk_lines(payload, settings)) if requests else None


def _chunk_lines(payload: dict, settings) -> int:
    return payload.get("chunk_lines") or settings.inference_batch_chunk_lines


def run_batch(ctx: JobContext, payload: dict) -> dict:
    model = payload["model"]
    lines = _request_lines(ctx, payload)
    chunk_lines = _chunk_lines(payload, ctx.settings)
    ranges = chunk_ranges(len(lines), chunk_lines)
    # Before any chunk is written: a refused batch leaves no objects behind.
    check_fan_out(len(ranges), ctx.settings, f"{len(lines)} lines in chunks of {chunk_lines}; raise chunk_lines to "
                                             f"at least {-(-len(lines) // ctx.settings.max_children_per_job)}")
    specs = []
    for number, (start, end) in enumerate(ranges):
        key = ctx.write_output(to_text(lines[start:end]), name=f"chunks/{number:05d}.jsonl",
                               content_type="application/jsonl")
        specs.append({"type": "inference_chunk", "payload": {"model": model, "key": key, "first_line": start},
                      "requirements": {"model": model}, "idempotency_key": f"chunk-{number}"})
    ctx.submit_children(specs)
    children = _wait_for_children(ctx, len(ranges), len(lines))
    merged, failed = [], 0
    for (start, end), child in zip(ranges, children):
        if child.state == "succeeded":
            part = [json.loads(line) for line in split_lines(ctx.storage.get_bytes(ctx.settings.bucket_outputs,
                                                                                   child.output_key))]
        else:
            part = failed_chunk_lines(lines[start:end], start, child.error or child.state)
        failed += sum(1 for line in part if line["error"])
        merged.extend(part)
    key = ctx.write_output(to_jsonl(merged), name=RESULTS_NAME, content_type="application/jsonl")
    ctx.progress(len(lines), len(lines), force=True)
    return {"_output_key": key, "model": model, "lines": len(lines), "succeeded": len(lines) - failed,
            "failed": failed, "chunks": len(ranges)}


def to_text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _request_lines(ctx: JobContext, payload: dict) -> list[str]:
    if ctx.input_key and payload.get("requests"):
        raise ValueError("give the requests inline or as an input file, not both")
    if ctx.input_key:
        lines = split_lines(ctx.read_input())
    elif payload.get("requests"):
        lines = [json.dumps(r, separators=(",", ":")) for r in payload["requests"]]
    else:
        raise ValueError("no requests: upload a JSONL file (input_key) or pass payload.requests")
    if not lines:
        raise ValueError("the input file has no request lines")
    return lines


def _wait_for_children(ctx: JobContext, chunks: int, total_lines: int) -> list[Job]:
    """The chunk jobs in chunk order once all are final; progress = lines finished so far."""
    with ctx.child_notices() as notices:
        while True:
            rows = ctx.children()
            by_chunk = {int(r.idempotency_key.rsplit("chunk-", 1)[1]): r for r in rows}
            done = sum(_lines_done(r) for r in rows)
            if len(by_chunk) == chunks and all(r.state in FINAL for r in rows):
                return [by_chunk[n] for n in range(chunks)]
            ctx.progress(min(done, total_lines), total_lines,
                         f"{sum(r.state in FINAL for r in rows)}/{chunks} chunks")
            notices.sleep(POLL_SECONDS, [r.id for r in rows if r.state not in FINAL])


def _lines_done(row: Job) -> int:
    if row.state == "succeeded" and row.result:
        return int(row.result.get("lines", 0))
    return int((row.progress or {}).get("done", 0))


# --- one chunk -----------------------------------------------------------------------


def validate_chunk(payload: Any) -> dict:
    _check_model(payload)
    if not isinstance(payload.get("key"), str) or not isinstance(payload.get("first_line"), int):
        raise ValueError("payload needs key (the chunk's object) and first_line")
    return payload


def run_chunk(ctx: JobContext, payload: dict) -> dict:
    model, first = payload["model"], payload["first_line"]
    raw_lines = split_lines(ctx.storage.get_bytes(ctx.settings.bucket_outputs, payload["key"]))
    lines = [parse_line(first + offset, raw, model) for offset, raw in enumerate(raw_lines)]
    backend = serving.current().backend_for(model)
    results: dict[int, dict] = {line.number: error_line(line.number, line.custom_id, line.error)
                                for line in lines if line.call is None}
    valid = [line for line in lines if line.call is not None]
    # Threads, so the backend sees every line at once and batches them (vLLM and ours alike).
    with ThreadPoolExecutor(max_workers=max(1, min(len(valid), ctx.settings.inference_concurrency))) as pool:
        futures = {pool.submit(_generate, backend, line): line for line in valid}
        for done_count, future in enumerate(as_completed(futures), start=len(results) + 1):
            line = futures[future]
            results[line.number] = future.result()
            ctx.progress(done_count, len(lines))
            if ctx.cancel_event.is_set() or ctx.lost_event.is_set():
                for pending in futures:
                    pending.cancel()
                ctx.check_cancelled()
    ordered = [results[line.number] for line in lines]
    failed = sum(1 for line in ordered if line["error"])
    key = ctx.write_output(to_jsonl(ordered), name="results.jsonl", content_type="application/jsonl")
    return {"_output_key": key, "lines": len(lines), "succeeded": len(lines) - failed, "failed": failed}


def _generate(backend, line: BatchLine) -> dict:
    try:
        return success_line(line, build_response(line.call, backend.generate(line.call.generation)))
    except OpenAIError as exc:
        return error_line(line.number, line.custom_id, exc)


inference = JobType(name="inference", run=run_batch, validate=validate_batch, fan_out=batch_chunks)
# Internal: its payload.key names any object in the outputs bucket.
inference_chunk = JobType(name="inference_chunk", run=run_chunk, validate=validate_chunk, accepts_input=False,
                          public=False)
