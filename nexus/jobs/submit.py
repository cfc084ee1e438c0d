"""Submission: validate, insert rows, commit, then publish one message per new job (within its
tenant's share of the queue; the others are held rows, published later by nexus.jobs.fairshare).

Shared by the API, child jobs inside workers, and the client-less benchmarks.
If publishing fails the new rows are deleted again, so a rejected submission
leaves neither a row nor a usable message (a message that did go out finds no
row to claim and is dropped).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Iterable

import redis
from celery import Celery
from pydantic import ValidationError
from sqlalchemy import Engine

from nexus.config import Settings
from nexus.db.engine import autocommit
from nexus.jobs import lifecycle, queries
from nexus.jobs.children import delete_unstarted_children, insert_children
from nexus.jobs.fanout import TooManyChildren, check_fan_out
from nexus.jobs.lifecycle import JobSpec
from nexus.jobs.records import Job, Lease
from nexus.jobs.registry import UnknownJobType, get_job_type, job_type_names, public_job_type_names
from nexus.jobs.schemas import JobRequest
from nexus.jobs.states import JobState
from nexus.queueing.message import JobMessage, publish_all
from nexus.queueing.routing import Requirements, master_queue, route_for, vram_thresholds
from nexus.replicas.lsn import commit_lsn

class SubmissionError(ValueError):
    """A submission that cannot be accepted; `details` says where."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


class PayloadTooLarge(SubmissionError):
    """A payload over Settings.max_payload_bytes (413): large data goes to POST /api/v1/inputs."""


class PublishError(RuntimeError):
    """The broker did not take the messages; nothing was kept."""


def parse_request(raw: Any) -> JobRequest:
    """Check the shape of one submitted job (a dict or an already validated JobRequest)."""
    if isinstance(raw, JobRequest):
        return raw
    try:
        return JobRequest.model_validate(raw)
    except ValidationError as exc:
        raise SubmissionError("invalid job request", {"errors": _pydantic_errors(exc)}) from None


def build_spec(raw: Any, settings: Settings, tenant: str, parent_id: uuid.UUID | None = None,
               allow_internal: bool = False) -> JobSpec:
    """Turn one submitted job into a JobSpec, or raise SubmissionError saying what is wrong.

    `allow_internal`: the platform itself submits (a running job's children, the /v1 routes);
    clients may only submit public job types."""
    request = parse_request(raw)
    try:
        job_type = get_job_type(request.type)
    except UnknownJobType:
        raise SubmissionError(f"unknown job type {request.type!r}",
                              {"known_types": job_type_names() if allow_internal else public_job_type_names()}) \
            from None
    if not (job_type.public or allow_internal):
        raise SubmissionError(f"job type {request.type} is internal: only the platform creates it",
                              {"field": "type", "public_types": public_job_type_names()})
    _check_payload_size(request.payload, settings)
    payload = request.payload
    if job_type.validate is not None:
        try:
            payload = job_type.validate(payload)
        except (ValueError, TypeError) as exc:
            raise SubmissionError(f"invalid payload for {request.type}: {exc}", {"field": "payload"}) from None
    try:
        requirements = Requirements.parse({**job_type.default_requirements, **request.requirements})
    except ValueError as exc:
        raise SubmissionError(str(exc), {"field": "requirements"}) from None
    if request.input_key is not None and not job_type.accepts_input:
        raise SubmissionError(f"job type {request.type} takes no input object", {"field": "input_key"})
    if job_type.fan_out is not None and (children := job_type.fan_out(payload, settings)) is not None:
        try:
            check_fan_out(children, settings)
        except TooManyChildren as exc:
            raise SubmissionError(str(exc), {"field": "payload", **exc.details}) from None
    return JobSpec(
        type=request.type,
        queue=master_queue(request.type) if job_type.runs_on_master else route_for(requirements,
                                                                                   vram_thresholds(settings)),
        payload=payload,
        input_key=request.input_key,
        requirements=requirements.to_dict(),
        priority=request.priority,
        max_attempts=request.max_attempts or settings.default_max_attempts,
        tenant=tenant,
        idempotency_key=request.idempotency_key,
        parent_id=parent_id,
    )


def _check_payload_size(payload: Any, settings: Settings) -> None:
    size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    if size > settings.max_payload_bytes:
        raise PayloadTooLarge(f"payload is {size} bytes; at most {settings.max_payload_bytes} "
                              "(upload large data with POST /api/v1/inputs and pass its input_key)",
                              {"field": "payload", "size": size, "max_payload_bytes": settings.max_payload_bytes})


def _pydantic_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]


class Submitter:
    def __init__(self, settings: Settings, engine: Engine, celery: Celery, broker: redis.Redis | None = None):
        self.settings = settings
        self.engine = engine
        self.writes = autocommit(engine)  # the insert is one statement: its own transaction
        self.celery = celery
        self.broker = broker  # a redis client of the broker: messages go out as plain LPUSHes (publish_all)

    def submit_many(
        self, raws: list[dict[str, Any]], tenant: str, parent_id: uuid.UUID | None = None, allow_internal: bool = False
    ) -> list[tuple[Job, bool]]:
        """Validate all, insert all in one transaction, publish the new ones.

        Returns (job, created) per input in order; `created` is False for an
        idempotent repeat, which returns the existing job and publishes nothing.
        `allow_internal`: the platform submits, so internal job types are allowed (see build_spec).
        """
        specs = []
        for index, raw in enumerate(raws):
            try:
                specs.append(build_spec(raw, self.settings, tenant, parent_id, allow_internal))
            except SubmissionError as exc:
                if len(raws) > 1:
                    exc.details = {"index": index, **exc.details}
                raise
        return self.submit_specs(specs)

    def submit_children(self, parent: Lease, tenant: str, raws: list[dict[str, Any]]) -> list[uuid.UUID]:
        """A running job's children, under its lease (the worker's own path: its database role inserts
        nothing else); the ids in order, an idempotent repeat's being the existing child's."""
        specs = []
        for index, raw in enumerate(raws):
            try:
                specs.append(build_spec(raw, self.settings, tenant, parent.job_id, allow_internal=True))
            except SubmissionError as exc:
                if len(raws) > 1:
                    exc.details = {"index": index, **exc.details}
                raise
        _check_unique_keys(specs)
        with self.writes.connect() as conn:
            rows = insert_children(conn, parent, specs)
            new_specs = [s for s in specs if s.id in rows and rows[s.id].created]
            lsn = commit_lsn(conn) if any(get_job_type(s.type).reads_standby for s in new_specs) else None
        if len(rows) < len(specs):
            raise SubmissionError("children not accepted: the parent's attempt no longer holds its lease, "
                                  "or a key names another job's child", {"missing": len(specs) - len(rows)})
        try:
            self.publish(new_specs, lsn)
        except Exception as exc:
            with self.engine.begin() as conn:
                delete_unstarted_children(conn, parent, [s.id for s in new_specs])
            raise PublishError(f"broker unavailable: {exc}") from exc
        return [rows[s.id].id for s in specs]

    def submit_specs(self, specs: list[JobSpec]) -> list[tuple[Job, bool]]:
        _check_unique_keys(specs)
        with self.writes.connect() as conn:
            # All rows or none, one statement; past its tenant's share of a queue a job is held (not published).
            share = self.settings.max_broker_messages_per_tenant
            if not any(get_job_type(s.type).fair_share for s in specs):
                share = 0
            inserted = lifecycle.insert_jobs(conn, specs, share)
            new_specs = [s for s in specs if s.id in inserted]
            to_publish = [s for s in new_specs if inserted[s.id].published]
            repeats = [s for s in specs if s.id not in inserted]
            repeated_keys = [s.idempotency_key for s in repeats if s.idempotency_key]
            existing = queries.find_by_idempotency(conn, specs[0].tenant, repeated_keys) if repeats else {}
            # Read after the commit: a worker's standby that replayed this far has the new rows.
            lsn = commit_lsn(conn) if any(get_job_type(s.type).reads_standby for s in to_publish) else None
        try:
            self.publish(to_publish, lsn)
        except Exception as exc:
            with self.engine.begin() as conn:
                lifecycle.delete_unstarted(conn, [s.id for s in new_specs])
            raise PublishError(f"broker unavailable: {exc}") from exc
        out: list[tuple[Job, bool]] = []
        for spec in specs:
            if spec.id in inserted:
                out.append((_row_from_spec(spec, inserted[spec.id].created_at), True))
            else:  # not inserted: an idempotent repeat, so it has a key
                out.append((existing[str(spec.idempotency_key)], False))
        return out

    def publish(self, specs: Iterable[JobSpec], read_after_lsn: str | None = None) -> None:
        """One message per job: its id, the attempt it is meant for (the first) and the commit LSN."""
        specs = list(specs)
        if specs:
            publish_all(self.celery, [JobMessage(str(s.id), 1, s.queue, s.priority, read_after_lsn) for s in specs],
                        self.broker)


def _check_unique_keys(specs: list[JobSpec]) -> None:
    seen: set[str] = set()
    for index, spec in enumerate(specs):
        if spec.idempotency_key is None:
            continue
        if spec.idempotency_key in seen:
            raise SubmissionError("idempotency_key repeated within one request", {"index": index})
        seen.add(spec.idempotency_key)


def _row_from_spec(spec: JobSpec, created_at: datetime) -> Job:
    """The new job as the API returns it, without a read-back query."""
    return Job(
        id=spec.id, type=spec.type, state=JobState.QUEUED.value, priority=spec.priority, tenant=spec.tenant,
        attempt=0, max_attempts=spec.max_attempts, requirements=spec.requirements, queue=spec.queue,
        payload=spec.payload, input_key=spec.input_key, idempotency_key=spec.idempotency_key,
        parent_id=spec.parent_id, result=None, output_key=None, error=None, progress=None, node=None,
        cancel_requested=False, created_at=created_at, started_at=None, finished_at=None, updated_at=created_at,
    )
