"""Batch inference: a JSONL of a few hundred requests in the object store, split across chunk jobs,
merged back in input order, with progress and per-line errors."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import auth
from tests.inference_support import TINY, model_worker, tiny_model_dir, tiny_served  # noqa: F401
from tests.support import wait_for

pytestmark = pytest.mark.timeout(180)

LINES = 300
BAD = {17: "not json at all",
       101: json.dumps({"custom_id": "r101", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 9}}),
       250: json.dumps({"custom_id": "r250", "url": "/v1/completions",
                        "body": {"prompt": "word " * 600, "max_tokens": 4}})}


def request_line(i: int) -> str:
    if i in BAD:
        return BAD[i]
    if i % 2:
        return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4,
                                    "temperature": 0}})
    return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": f"Line {i}:", "max_tokens": 4, "temperature": 0}})


def test_a_batch_of_hundreds_of_lines(api, services, tiny_served):
    data = "\n".join(request_line(i) for i in range(LINES)).encode()
    key = api.post("/api/v1/inputs?name=requests.jsonl", data=data, headers=auth()).json["key"]
    submitted = api.post("/api/v1/jobs", headers=auth(), json={
        "type": "inference", "payload": {"model": TINY, "chunk_lines": 50}, "input_key": key,
        "requirements": {"model": TINY}})
    assert submitted.status_code == 201, submitted.json
    job_id = submitted.json["id"]

    seen_progress = []

    def finished():
        job = api.get(f"/api/v1/jobs/{job_id}?wait=5", headers=auth()).json
        if job["progress"]:
            seen_progress.append(job["progress"]["done"])
        return job if job["state"] in ("succeeded", "failed") else None

    job = wait_for(finished, timeout=150, interval=0.2, what="the batch job")
    assert job["state"] == "succeeded", job["error"]
    assert job["result"] == {"model": TINY, "lines": LINES, "succeeded": LINES - len(BAD), "failed": len(BAD),
                             "chunks": 6}
    assert job["progress"] == {"done": LINES, "total": LINES}
    assert seen_progress == sorted(seen_progress)

    children = api.get(f"/api/v1/jobs?parent_id={job_id}", headers=auth()).json["jobs"]
    assert len(children) == 6 and {c["type"] for c in children} == {"inference_chunk"}
    assert {c["queue"] for c in children} == {f"model.{TINY}"}

    results = [json.loads(line) for line in requests.get(job["output_url"], timeout=10).text.splitlines()]
    assert [r["id"] for r in results] == [f"batch_req_{i}" for i in range(LINES)]
    assert [r["custom_id"] for r in results if not r["error"]] == [f"r{i}" for i in range(LINES) if i not in BAD]
    assert results[17]["error"]["code"] == "invalid_json"
    assert results[101]["response"]["status_code"] == 400 and results[101]["error"]["code"] == "invalid_value"
    assert results[250]["error"]["code"] == "context_length_exceeded"
    chat, completion = results[1]["response"]["body"], results[2]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] <= 4


def test_inline_requests_and_bad_batches(api, services, tiny_served):
    inline = api.post("/api/v1/jobs", headers=auth(), json={
        "type": "inference", "requirements": {"model": TINY},
        "payload": {"model": TINY, "requests": [{"prompt": "Hello", "max_tokens": 3, "temperature": 0}] * 3}})
    assert inline.status_code == 201
    job = api.get(f"/api/v1/jobs/{inline.json['id']}?wait=30", headers=auth()).json
    assert job["state"] == "succeeded" and job["result"]["succeeded"] == 3 and job["result"]["chunks"] == 1
    texts = [json.loads(line)["response"]["body"]["choices"][0]["text"]
             for line in requests.get(job["output_url"], timeout=10).text.splitlines()]
    assert len(set(texts)) == 1  # greedy: the same prompt gives the same answer in any batch

    for payload, message in [({"requests": []}, "payload.model"), ({"model": TINY, "requests": []}, "requests"),
                             ({"model": TINY, "chunk_lines": 0}, "chunk_lines"), ({"model": TINY, "x": 1}, "unknown")]:
        refused = api.post("/api/v1/jobs", headers=auth(), json={"type": "inference", "payload": payload})
        assert refused.status_code == 400 and message in refused.json["error"]["message"]
