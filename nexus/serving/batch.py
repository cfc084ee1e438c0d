"""Batch inference files: request lines in, result lines out, in the OpenAI batch format.

A request line is either OpenAI's batch shape
    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
or a bare request body ({"messages": ...} or {"prompt": ...}). A result line is
    {"id", "custom_id", "response": {"status_code", "body"}, "error"}
with `error` set ({code, message}) for a line that failed; other lines go on.
Pure functions: the job handlers do the I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nexus.inference.openai_shapes import ApiCall, Endpoint, OpenAIError, parse_body

URL_ENDPOINTS = {"/v1/chat/completions": Endpoint.CHAT, "/v1/completions": Endpoint.COMPLETIONS}


@dataclass(frozen=True)
class BatchLine:
    number: int  # 0-based position in the input file
    custom_id: str
    call: ApiCall | None  # None when the line is invalid
    error: OpenAIError | None = None


def split_lines(data: bytes | str) -> list[str]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return [line for line in text.splitlines() if line.strip()]


def chunk_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) line ranges of at most `size` lines."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def parse_line(number: int, raw: str, model: str) -> BatchLine:
    """One input line; the batch's model applies where the body names none."""
    custom_id = f"line-{number}"
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise OpenAIError("each line must be a JSON object")
        custom_id = str(obj.get("custom_id", custom_id))
        body, endpoint = _body_and_endpoint(obj)
        if body.get("model", model) != model:
            raise OpenAIError(f"this batch runs model {model!r}, the line asks for {body['model']!r}", param="model")
        if body.get("stream"):
            raise OpenAIError("stream is not available in batch requests", param="stream")
        return BatchLine(number, custom_id, parse_body(endpoint, {**body, "model": model}))
    except json.JSONDecodeError as exc:
        return BatchLine(number, custom_id, None, OpenAIError(f"line is not valid JSON: {exc}", code="invalid_json"))
    except OpenAIError as exc:
        return BatchLine(number, custom_id, None, exc)


def _body_and_endpoint(obj: dict) -> tuple[dict, Endpoint]:
    if "body" in obj:
        url = obj.get("url", "/v1/chat/completions")
        if url not in URL_ENDPOINTS:
            raise OpenAIError(f"url must be one of {sorted(URL_ENDPOINTS)}", param="url")
        if not isinstance(obj["body"], dict):
            raise OpenAIError("body must be an object", param="body")
        return obj["body"], URL_ENDPOINTS[url]
    body = {k: v for k, v in obj.items() if k != "custom_id"}  # the line's id, not a request field
    return body, Endpoint.CHAT if "messages" in obj else Endpoint.COMPLETIONS


def success_line(line: BatchLine, response: dict) -> dict[str, Any]:
    return {"id": f"batch_req_{line.number}", "custom_id": line.custom_id,
            "response": {"status_code": 200, "body": response}, "error": None}


def error_line(number: int, custom_id: str, error: OpenAIError) -> dict[str, Any]:
    return {"id": f"batch_req_{number}", "custom_id": custom_id,
            "response": {"status_code": error.status, "body": error.body()},
            "error": {"code": error.code or error.type, "message": error.message}}


def failed_chunk_lines(raw_lines: list[str], first_number: int, reason: str) -> list[dict[str, Any]]:
    """Error lines for a chunk whose job failed as a whole (its worker kept failing)."""
    out = []
    for offset, raw in enumerate(raw_lines):
        custom_id = f"line-{first_number + offset}"
        try:
            custom_id = str(json.loads(raw).get("custom_id", custom_id))
        except (ValueError, AttributeError):
            pass
        out.append(error_line(first_number + offset, custom_id,
                              OpenAIError(f"chunk failed: {reason}", code="chunk_failed", status=500,
                                          type="server_error")))
    return out


def to_jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n" for line in lines).encode()
