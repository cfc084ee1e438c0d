"""A running job's objects, for the worker holding its lease (docs/ARCHITECTURE.md, "Roles hold only what they
need"; the worker's side is nexus.storage.leased).

    GET  /api/v1/leases/<job>/<attempt>/objects/<bucket>/<key>   the object's bytes (HEAD: its ETag only)
    PUT  /api/v1/leases/<job>/<attempt>/objects/<bucket>/<key>   the body, stored as the object

`Authorization: Bearer <lease token>`: the token the job's claim drew (jobs.lease_token, known only to the
claimer), so only the attempt that holds the job may ask, and only while it holds it. `bucket` is `inputs`,
`outputs` or `receipts`; which keys a job may read or write is `may_read` / `may_write` below.

Why through the master rather than presigned URLs: a presigned PUT stays valid until it expires, after
the job has finished, and S3 cannot revoke one; a write through here is refused the moment the lease is
gone, and a receipt is never replaced. Reads come through here too, so that a worker needs no route to
the store for tenant data and no URL is signed for a host name only the master resolves. The bytes are
bounded (NEXUS_MAX_INPUT_BYTES for inputs, NEXUS_MAX_OUTPUT_BYTES for what workers write) and streamed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from apiflask import APIBlueprint
from flask import Response, request, stream_with_context
from minio.error import S3Error
from sqlalchemy import Connection, text

from nexus.api.errors import ApiError
from nexus.api.security import bearer_token, public, services
from nexus.proofs.jobs import PROOF_TYPE, SEGMENT_TYPE
from nexus.proofs.objects import receipt_key, segment_result_key

bp = APIBlueprint("leases", __name__, url_prefix="/api/v1/leases", tag="Leases")

BUCKETS = ("inputs", "outputs", "receipts")
ETAG_HEADER = "X-Nexus-ETag"  # nexus.storage.leased reads it: the store's ETag of the bytes answered
_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LeaseHolder:
    """The running attempt the caller holds, as far as its objects go."""

    id: uuid.UUID
    attempt: int
    type: str
    input_key: str | None
    parent_id: uuid.UUID | None
    payload: Any


def output_prefix(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/"  # JobContext.output_key


def plain_key(key: str) -> bool:
    """No `.`/`..` segments, empty segments or control characters: a store that maps keys to paths
    (SeaweedFS's filer) must not resolve `jobs/<mine>/../<yours>` to someone else's object."""
    parts = key.split("/")
    return bool(key) and len(key) <= 1024 and key.isprintable() and "\\" not in key \
        and all(part not in ("", ".", "..") for part in parts)


def may_write(job: LeaseHolder, bucket: str, key: str) -> bool:
    """Its own outputs; its own receipt or segment result (the exact key, never another's)."""
    if bucket == "outputs":
        return key.startswith(output_prefix(job.id))
    if bucket == "receipts":
        return key in own_receipts(job)
    return False


def own_receipts(job: LeaseHolder) -> set[str]:
    if job.type == PROOF_TYPE:
        return {receipt_key(job.id)}
    if job.type == SEGMENT_TYPE and isinstance(job.payload, dict) and job.parent_id is not None:
        segment = job.payload.get("segment")
        index = segment.get("index") if isinstance(segment, dict) else None
        if str(job.payload.get("proof_id")) == str(job.parent_id) and isinstance(index, int):
            return {segment_result_key(job.parent_id, index, job.id, job.attempt)}
    return set()


def may_read(job: LeaseHolder, bucket: str, key: str) -> bool | uuid.UUID:
    """True, False, or the job id whose outputs `key` is under: readable if that job is this one's child
    (a batch merging its chunks' results); the caller asks the database."""
    if bucket == "inputs":
        return key == job.input_key
    if bucket == "receipts":  # a proof joins its segments' results; only its own segments wrote there
        return job.type == PROOF_TYPE and key.startswith(f"proofs/{job.id}/segments/")
    if bucket == "outputs":
        if key.startswith(output_prefix(job.id)) or (job.parent_id and key.startswith(output_prefix(job.parent_id))):
            return True  # its own; its parent's (a batch chunk reads the lines its parent wrote)
        owner = key.split("/")[1] if key.startswith("jobs/") and key.count("/") >= 2 else ""
        try:
            return uuid.UUID(owner) if owner else False
        except ValueError:
            return False
    return False


def _holder(conn: Connection, job_id: uuid.UUID, attempt: int, lock: bool = False) -> LeaseHolder:
    token = bearer_token()
    if token is None:
        raise ApiError(401, "missing lease token: send 'Authorization: Bearer <the claim's lease token>'",
                       headers={"WWW-Authenticate": 'Bearer realm="nexus"'})
    try:
        lease_token = uuid.UUID(token)
    except ValueError:
        raise ApiError(401, "a lease token is the UUID the job's claim returned") from None
    # FOR SHARE while a receipt is written: the attempt cannot finish (its outcome is an UPDATE of this
    # row) before the write is done, so nothing lands after the job finished.
    row = conn.execute(text(
        "SELECT id, attempt, type, input_key, parent_id, payload FROM jobs WHERE id = :id AND attempt = :attempt "
        "AND state = 'running' AND lease_token = :token" + (" FOR SHARE" if lock else "")),
        {"id": job_id, "attempt": attempt, "token": lease_token}).mappings().first()
    if row is None:
        raise ApiError(403, "this lease is not held: the job is not running this attempt under this token",
                       code="lease_not_held")
    return LeaseHolder(**row)


def _checked(job_id: uuid.UUID, bucket: str, key: str) -> str:
    if bucket not in BUCKETS:
        raise ApiError(404, f"no such bucket {bucket!r}: one of {', '.join(BUCKETS)}", {"field": "bucket"})
    if not plain_key(key):
        raise ApiError(400, "an object key has no empty, '.' or '..' segments", {"field": "key"})
    settings = services().settings
    return {"inputs": settings.bucket_inputs, "outputs": settings.bucket_outputs,
            "receipts": settings.bucket_receipts}[bucket]


def _refused(bucket: str, key: str) -> ApiError:
    return ApiError(403, f"{bucket}/{key} is not this job's to reach", {"bucket": bucket, "key": key},
                    code="not_this_jobs_object")


@bp.get("/<uuid:job_id>/<int:attempt>/objects/<bucket>/<path:key>")
@public  # the lease token is checked here, not by the API-token check of every route
@bp.doc(security="bearer", description="Authorization: Bearer <lease token>. One of the job's objects: its bytes, "
                                       "its ETag in X-Nexus-ETag (HEAD: the ETag only).")
def read(job_id: uuid.UUID, attempt: int, bucket: str, key: str) -> Response:
    real = _checked(job_id, bucket, key)
    s = services()
    with s.statements.connect() as conn:
        job = _holder(conn, job_id, attempt)
        allowed = may_read(job, bucket, key)
        if isinstance(allowed, uuid.UUID):
            allowed = conn.execute(text("SELECT 1 FROM jobs WHERE id = :child AND parent_id = :id"),
                                   {"child": allowed, "id": job.id}).first() is not None
    if not allowed:
        raise _refused(bucket, key)
    if request.method == "HEAD":
        etag = s.store.etag(real, key)
        if etag is None:
            raise _missing(bucket, key)
        return Response(status=200, headers={ETAG_HEADER: etag})
    try:
        obj = s.store.client.get_object(bucket_name=real, object_name=key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchBucket"):
            raise _missing(bucket, key) from None
        raise

    def body() -> Iterator[bytes]:
        try:
            yield from obj.stream(_CHUNK_BYTES)
        finally:
            obj.close()
            obj.release_conn()

    headers = {ETAG_HEADER: (obj.headers.get("ETag") or "").strip('"'), "Content-Length": obj.headers.get("Content-Length")}
    return Response(stream_with_context(body()), status=200, headers={k: v for k, v in headers.items() if v},
                    content_type=obj.headers.get("Content-Type") or "application/octet-stream")


def _missing(bucket: str, key: str) -> ApiError:
    return ApiError(404, f"{bucket}/{key} does not exist", {"bucket": bucket, "key": key})


@bp.put("/<uuid:job_id>/<int:attempt>/objects/<bucket>/<path:key>")
@public
@bp.doc(security="bearer", description="Authorization: Bearer <lease token>. Body: the object's bytes. Stores one "
                                       "of the job's outputs or its receipt (a receipt only once).")
def write(job_id: uuid.UUID, attempt: int, bucket: str, key: str) -> tuple[dict[str, str], int]:
    real = _checked(job_id, bucket, key)
    s = services()
    request.max_content_length = s.settings.max_output_bytes
    length = request.content_length
    if length is None:
        raise ApiError(411, "send Content-Length: the master stores the body as one object")
    if length > s.settings.max_output_bytes:
        raise ApiError(413, f"an object written through a lease holds at most {s.settings.max_output_bytes} bytes",
                       {"limit": s.settings.max_output_bytes})
    content_type = request.content_type or "application/octet-stream"
    if bucket == "receipts":
        with s.engine.begin() as conn:
            job = _holder(conn, job_id, attempt, lock=True)
            if not may_write(job, bucket, key):
                raise _refused(bucket, key)
            # One writer per receipt key at a time, so "not there yet" still holds when it is written.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"receipt:{key}"})
            if s.store.etag(real, key) is not None:
                raise ApiError(409, f"{bucket}/{key} is written already; a receipt is never replaced",
                               {"bucket": bucket, "key": key}, code="receipt_exists")
            etag = s.store.put_stream(real, key, request.stream, length, content_type)
    else:
        with s.statements.connect() as conn:
            job = _holder(conn, job_id, attempt)
        if not may_write(job, bucket, key):
            raise _refused(bucket, key)
        etag = s.store.put_stream(real, key, request.stream, length, content_type)
    return {"bucket": bucket, "key": key, "etag": etag}, 201
