"""Turning rows into the JSON the API returns (and the client reads)."""

from __future__ import annotations

from typing import Any

from nexus.jobs.records import Job, jsonable
from nexus.storage import ObjectStore


def row_view(row: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {k: jsonable(row.get(k)) for k in (fields or row.keys())}


def job_view(job: Job, store: ObjectStore | None = None, bucket: str | None = None) -> dict[str, Any]:
    """A job as JSON (its fields in the record's order); its output, if any, as a short-lived presigned URL."""
    out = job.to_json()
    if job.output_key and store is not None and bucket is not None:
        out["output_url"] = store.presigned_get(bucket, job.output_key)
    return out
