"""Turning rows into the JSON the API returns (and the client reads), and the models that describe it.

The pydantic models here are the answers of the job routes: each view's answer passes through its
model on the way out (APIFlask's `output`), and the OpenAPI document shows the same models, so the
document cannot describe a field the API does not send. Ids and times stay the strings the record
serialises (`Job.to_json`); the models only say which format they have.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from pydantic.config import JsonDict

from nexus.jobs.records import Job, jsonable
from nexus.storage import ObjectStore

_UUID: JsonDict = {"format": "uuid"}
_TIME: JsonDict = {"format": "date-time"}


def row_view(row: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {k: jsonable(row.get(k)) for k in (fields or row.keys())}


def job_view(job: Job, store: ObjectStore | None = None, bucket: str | None = None) -> dict[str, Any]:
    """A job as JSON (its fields in the record's order); its output, if any, as a short-lived presigned URL."""
    out = job.to_json()
    if job.output_key and store is not None and bucket is not None:
        out["output_url"] = store.presigned_get(bucket, job.output_key)
    return out


class JobView(BaseModel):
    """A job as the API answers it: the fields of `nexus.jobs.records.Job`, in its order."""

    id: str = Field(json_schema_extra=_UUID)
    type: str
    state: str = Field(description="queued, running, retrying, succeeded, failed or cancelled")
    priority: int
    tenant: str
    attempt: int
    max_attempts: int
    requirements: dict[str, Any]
    queue: str
    payload: Any
    input_key: str | None
    idempotency_key: str | None
    parent_id: str | None = Field(json_schema_extra=_UUID)
    result: Any
    output_key: str | None
    error: str | None
    progress: Any = Field(description='{"done": n, "total": m} while a job that reports progress runs')
    node: str | None
    cancel_requested: bool
    created_at: str = Field(json_schema_extra=_TIME)
    started_at: str | None = Field(json_schema_extra=_TIME)
    finished_at: str | None = Field(json_schema_extra=_TIME)
    updated_at: str = Field(json_schema_extra=_TIME)
    output_url: str | None = Field(None, description="a short-lived presigned GET of the output, when there is one")


class JobPage(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(description="pass back as `cursor` for the next page; null on the last")


class BulkJobAnswer(BaseModel):
    id: str = Field(json_schema_extra=_UUID)
    state: str
    created: bool = Field(description="false: an idempotent repeat of an existing job")


class BulkAnswer(BaseModel):
    jobs: list[BulkJobAnswer] = Field(description="in the order submitted")
    created: int


class JobEvent(BaseModel):
    at: str = Field(json_schema_extra=_TIME)
    from_state: str | None
    to_state: str
    attempt: int
    node: str | None
    message: str | None
    failure_kind: str | None = Field(description="infrastructure or job, on a failure")


class JobEvents(BaseModel):
    events: list[JobEvent]
