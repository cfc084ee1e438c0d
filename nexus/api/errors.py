"""Every error leaves the API as {"error": {"code", "message", "details"}} with the right status.

Dependencies that are down become 503 (never 500); anything unexpected is
logged with its traceback and answered 500 in the same shape, without the trace.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from apiflask import APIFlask, HTTPError
from flask import request
from pydantic import BaseModel, Field
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import TimeoutError as PoolTimeout, DBAPIError, OperationalError
from urllib3.exceptions import HTTPError as StorageConnectionError

from nexus.jobs.submit import PayloadTooLarge, PublishError, SubmissionError

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 411: "length_required", 413: "payload_too_large", 415: "unsupported_media_type",
          422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


class ApiError(HTTPError):
    """Raise from a view: `ApiError(404, "job not found")`, optionally with a code and details."""

    def __init__(self, status: int, message: str, details: dict | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, detail=details or {}, headers=headers, extra_data={"code": code} if code else None)


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable: bad_request, invalid_job, not_found, too_many_requests, ...")
    message: str = Field(description="what is wrong, for a person")
    details: dict[str, Any] = Field(description="which field, limit or dependency; {} when nothing more to say")


def error_schema() -> dict[str, Any]:
    """The OpenAPI schema of every error answer, from the model the handlers below fill."""
    return {"type": "object", "properties": {"error": ErrorInfo.model_json_schema()}, "required": ["error"],
            "description": "every error: a 4xx, or 503 when a dependency is down"}


# Answers any route behind a token may give besides its own (auth, role, rate and concurrency limits,
# a dependency down); the document lists them on every such operation.
COMMON_ERRORS = {401: "missing, invalid, expired or revoked token", 403: "the token's role may not call this",
                 429: "over a per-token limit (Retry-After says when to retry)",
                 503: "a dependency (database, broker, object store) is unavailable"}
BODY_ERRORS = {400: "invalid request (details.fields names the fields)", 413: "the body or a payload is too large",
               415: "the body is not JSON"}


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the common error answers to every operation of the document that needs a token."""
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation or path == "/healthz":
                continue
            responses = operation["responses"]
            errors = {**COMMON_ERRORS, **(BODY_ERRORS if "requestBody" in operation or "parameters" in operation
                                          else {})}
            for status, description in errors.items():
                responses.setdefault(str(status), {"description": description, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/HTTPError"}}}})
    return spec


def error_body(status: int, message: str, details=None, code: str | None = None) -> dict:
    return {"error": {"code": code or _CODES.get(status, "error"), "message": message, "details": details or {}}}


def install_error_handlers(app: APIFlask) -> None:
    app.config.update(HTTP_ERROR_SCHEMA=error_schema(), VALIDATION_ERROR_SCHEMA=error_schema())
    app.spec_processor(document_errors)
    @app.error_processor
    def shape(error: HTTPError):
        message = error.message or "error"
        details = error.detail or {}
        if error.status_code == 400 and "json" in details:  # apiflask validation errors
            message, details = "invalid request body", {"fields": details["json"]}
        elif error.status_code == 400 and "query" in details:
            message, details = "invalid query parameters", {"fields": details["query"]}
        elif error.status_code == 400 and not details and message == "Bad Request":
            message = "malformed request: the body must be valid JSON (Content-Type: application/json)"
        elif error.status_code == 413:
            message = message if details else f"request body larger than {request.max_content_length} bytes"
        return error_body(error.status_code, message, details, error.extra_data.get("code")), \
            error.status_code, error.headers

    @app.errorhandler(SubmissionError)
    def invalid_submission(exc: SubmissionError):
        return error_body(400, str(exc), exc.details, "invalid_job"), 400

    @app.errorhandler(PayloadTooLarge)
    def payload_too_large(exc: PayloadTooLarge):
        return error_body(413, str(exc), exc.details), 413

    @app.errorhandler(PublishError)
    def broker_refused(exc: PublishError):
        return error_body(503, "the broker is unavailable; nothing was submitted", {"cause": str(exc)[:300]}), 503

    @app.errorhandler(OperationalError)
    @app.errorhandler(DBAPIError)
    def database_down(exc):
        if isinstance(exc, DBAPIError) and not exc.connection_invalidated and not isinstance(exc, OperationalError):
            log.exception("database error")
            return error_body(500, "internal error"), 500
        log.warning("database unavailable: %s", exc)
        return error_body(503, "the database is unavailable", {"dependency": "database"}), 503

    @app.errorhandler(PoolTimeout)
    def database_busy(exc):
        # Every connection of this process's pool was out for the whole pool timeout: an overload, not a bug.
        log.warning("database pool exhausted: %s", exc)
        return error_body(503, "the API is busy: no database connection came free in time; retry shortly",
                          {"dependency": "database"}), 503, {"Retry-After": "1"}

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(BrokerError)
    def redis_down(exc):
        log.warning("redis unavailable: %s", exc)
        return error_body(503, "the broker is unavailable", {"dependency": "redis"}), 503

    @app.errorhandler(StorageConnectionError)
    def storage_down(exc):
        log.warning("object storage unavailable: %s", exc)
        return error_body(503, "object storage is unavailable", {"dependency": "storage"}), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        if isinstance(exc, HTTPError):
            return shape(exc)
        log.exception("unhandled error")
        return error_body(500, "internal error; the server log has the details"), 500
