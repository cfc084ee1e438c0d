"""Turning rows into the JSON the API returns (and the client reads)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from nexus.jobs.records import Job


def jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def row_view(row: dict, fields: tuple[str, ...] | None = None) -> dict:
    return {k: jsonable(row.get(k)) for k in (fields or row.keys())}


def job_view(job: Job, store=None, bucket: str | None = None) -> dict:
    """A job as JSON (its fields in the record's order); its output, if any, as a short-lived presigned URL."""
    out = job.to_json()
    if job.output_key and store is not None:
        out["output_url"] = store.presigned_get(bucket, job.output_key)
    return out
