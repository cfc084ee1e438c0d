"""Jobs: submit one or many, read, list, follow events, cancel, retry."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import datetime
from typing import Any

from apiflask import APIBlueprint
from flask import request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from nexus.api.errors import ApiError
from nexus.api.inputs import tenant_prefix
from nexus.api.limits import check_priority, long_poll
from nexus.api.security import caller, require, services
from nexus.api.views import BulkAnswer, JobEvents, JobPage, JobView, job_view, row_view
from nexus.auth import Role
from nexus.jobs import lifecycle, queries
from nexus.jobs.records import Job
from nexus.jobs.schemas import BulkJobRequest, JobRequest
from nexus.jobs.notify import job_channel
from nexus.jobs.states import FINAL_STATES, JobState

FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)

bp = APIBlueprint("jobs", __name__, url_prefix="/api/v1/jobs", tag="Jobs")


_Answer = dict[str, str | dict[str, dict[str, Any]]]


def answer_ref(description: str, schema: str) -> _Answer:
    """A second success answer of an operation, in the schema its `output` model registered."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_REPEATED: dict[int | str, _Answer] = {200: answer_ref("an idempotent repeat: the existing job", "JobView")}


class JobListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: JobState | None = None
    type: str | None = Field(None, max_length=64)
    tenant: str | None = Field(None, max_length=64)
    parent_id: uuid.UUID | None = None
    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=200)


def _tenant_for(requested: str | None) -> str:
    """Submitters act in their own tenant; admins may name one."""
    principal = caller()
    if requested and requested != principal.tenant and not principal.is_admin:
        raise ApiError(403, "only admins may submit for another tenant", {"field": "tenant"})
    return requested or principal.tenant


def _check_inputs(jobs: list[JobRequest], tenant: str) -> None:
    """A tenant's jobs may only read that tenant's uploads (admins may reference any key)."""
    if caller().is_admin:
        return
    for index, job in enumerate(jobs):
        if job.input_key is not None and not job.input_key.startswith(tenant_prefix(tenant)):
            raise ApiError(403, "input_key must be one of your tenant's uploads (POST /api/v1/inputs)",
                           {"field": "input_key", "index": index})


def _check_priorities(jobs: list[JobRequest]) -> None:
    for index, job in enumerate(jobs):
        check_priority(caller(), job.priority, services().settings, index if len(jobs) > 1 else None)


def _view(job: Job) -> dict[str, Any]:
    s = services()
    return job_view(job, s.store, s.settings.bucket_outputs)


def load_job(job_id: uuid.UUID) -> Job:
    """The job, if the caller may see it; 404 otherwise (another tenant's job does not exist for you)."""
    with services().statements.connect() as conn:
        job = queries.get(conn, job_id)
    if job is None or (not caller().is_admin and job.tenant != caller().tenant):
        raise ApiError(404, f"job {job_id} not found")
    return job


class WaitQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wait: float = Field(0, ge=0, le=30, description="hold the request up to this many seconds until the job is final")


@bp.post("")
@bp.input(WaitQuery, location="query", arg_name="query")
@bp.input(JobRequest, arg_name="job")
@bp.output(JobView, status_code=201, description="created (with ?wait=, as it stands when final or when the wait ends)")
@bp.doc(security="bearer", responses=_REPEATED)
@require(Role.SUBMITTER)
def submit(query: WaitQuery, job: JobRequest) -> tuple[dict[str, Any], int]:
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None:
        if not 0 < len(header_key) <= 256:
            raise ApiError(400, "Idempotency-Key must be 1 to 256 characters", {"header": "Idempotency-Key"})
        if job.idempotency_key not in (None, header_key):
            raise ApiError(400, "Idempotency-Key header and idempotency_key field differ")
        job = job.model_copy(update={"idempotency_key": header_key})
    tenant = _tenant_for(job.tenant)
    _check_inputs([job], tenant)
    _check_priorities([job])
    if not query.wait:
        [(row, created)] = services().submitter.submit_many([job], tenant=tenant)
        return _view(row), 201 if created else 200
    with long_poll(caller(), query.wait, services().settings):  # taken before the job exists: a 429 creates none
        [(row, created)] = services().submitter.submit_many([job], tenant=tenant)
        if row.state not in FINAL_VALUES:
            row = _wait_until_final(row.id, query.wait)  # a synchronous run: one request instead of two
    return _view(row), 201 if created else 200


@bp.post("/bulk")
@bp.input(BulkJobRequest, arg_name="bulk")
@bp.output(BulkAnswer, status_code=201)
@bp.doc(security="bearer")
@require(Role.SUBMITTER)
def submit_bulk(bulk: BulkJobRequest) -> tuple[dict[str, Any], int]:
    limit = services().settings.max_bulk_jobs
    if len(bulk.jobs) > limit:
        raise ApiError(413, f"at most {limit} jobs per bulk request", {"jobs": len(bulk.jobs)})
    tenants = {_tenant_for(j.tenant) for j in bulk.jobs}
    if len(tenants) > 1:
        raise ApiError(400, "one bulk request submits for one tenant", {"tenants": sorted(tenants)})
    tenant = tenants.pop()
    _check_inputs(bulk.jobs, tenant)
    _check_priorities(bulk.jobs)
    results = services().submitter.submit_many(bulk.jobs, tenant=tenant)
    jobs = [{"id": str(row.id), "state": row.state, "created": created} for row, created in results]
    return {"jobs": jobs, "created": sum(1 for j in jobs if j["created"])}, 201


@bp.get("/<uuid:job_id>")
@bp.input(WaitQuery, location="query", arg_name="query")
@bp.output(JobView)
@bp.doc(security="bearer")
def get_job(job_id: uuid.UUID, query: WaitQuery) -> dict[str, Any]:
    if not query.wait:
        return _view(load_job(job_id))
    with long_poll(caller(), query.wait, services().settings):
        return _view(_wait_until_final(job_id, query.wait))


def _wait_until_final(job_id: uuid.UUID, seconds: float) -> Job:
    """Long-poll: workers announce each outcome on the job's Redis channel; the row stays the truth."""
    pubsub = services().redis.pubsub()
    try:
        pubsub.subscribe(job_channel(job_id))
        deadline = time.monotonic() + seconds
        pubsub.get_message(timeout=min(seconds, 1.0))  # the confirmation: from now on no notice is missed
        job = load_job(job_id)  # so an outcome before this read shows in the row, any later one is announced
        while job.state not in FINAL_VALUES and (remaining := deadline - time.monotonic()) > 0:
            pubsub.get_message(timeout=min(remaining, 1.0))  # a notice, or a second passed
            job = load_job(job_id)
        return job
    finally:
        pubsub.close()


@bp.get("")
@bp.input(JobListQuery, location="query", arg_name="query")
@bp.output(JobPage)
@bp.doc(security="bearer")
def list_jobs(query: JobListQuery) -> dict[str, Any]:
    """Newest first; pass `next_cursor` back as `cursor` for the next page."""
    tenant = query.tenant if caller().is_admin else caller().tenant
    where = queries.JobFilter(tenant=tenant, state=query.state.value if query.state else None, type=query.type,
                              parent_id=query.parent_id,
                              before=_decode_cursor(query.cursor) if query.cursor else None)
    with services().statements.connect() as conn:
        page, more = queries.list_jobs(conn, where, query.limit)
    return {"jobs": [_view(job) for job in page],
            "next_cursor": _encode_cursor(page[-1]) if more else None}


@bp.get("/<uuid:job_id>/events")
@bp.output(JobEvents)
@bp.doc(security="bearer")
def job_events(job_id: uuid.UUID) -> dict[str, Any]:
    load_job(job_id)
    with services().statements.connect() as conn:
        rows = conn.execute(
            text("SELECT at, from_state, to_state, attempt, node, message, failure_kind FROM job_events "
                 "WHERE job_id = :id ORDER BY id"), {"id": job_id}).mappings()
        return {"events": [row_view(dict(r)) for r in rows]}


@bp.post("/<uuid:job_id>/cancel")
@bp.output(JobView)
@bp.doc(security="bearer")
@require(Role.SUBMITTER)
def cancel(job_id: uuid.UUID) -> dict[str, Any]:
    """A waiting job is cancelled at once; a running one stops at its next check."""
    load_job(job_id)
    with services().engine.begin() as conn:
        lifecycle.request_cancel(conn, job_id, by=caller().name)
    return _view(load_job(job_id))


@bp.post("/<uuid:job_id>/retry")
@bp.output(JobView)
@bp.doc(security="bearer", responses={409: "only failed or cancelled jobs can be retried"})
@require(Role.SUBMITTER)
def retry(job_id: uuid.UUID) -> dict[str, Any]:
    """Give a failed or cancelled job one more attempt."""
    job = load_job(job_id)
    with services().engine.begin() as conn:
        row = lifecycle.manual_retry(conn, job_id, by=caller().name)
    if row is None:
        raise ApiError(409, f"only failed or cancelled jobs can be retried; this one is {job.state}",
                       {"state": job.state})
    return _view(load_job(job_id))


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(at), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid cursor", {"field": "cursor"}) from None
