"""Turning rows into the JSON the API returns (and the client reads)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

JOB_FIELDS = ("id", "type", "state", "priority", "tenant", "attempt", "max_attempts", "requirements", "queue",
              "payload", "input_key", "idempotency_key", "parent_id", "result", "output_key", "error", "progress",
              "node", "cancel_requested", "created_at", "started_at", "finished_at", "updated_at")


def jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def row_view(row: dict, fields: tuple[str, ...] | None = None) -> dict:
    return {k: jsonable(row.get(k)) for k in (fields or row.keys())}


def job_view(row: dict, store=None, bucket: str | None = None) -> dict:
    """A job as JSON; its output, if any, as a short-lived presigned URL."""
    out = row_view(row, JOB_FIELDS)
    if row.get("output_key") and store is not None:
        out["output_url"] = store.presigned_get(bucket, row["output_key"])
    return out
