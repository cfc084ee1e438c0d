"""Every error leaves the API as {"error": {"code", "message", "details"}} with the right status.

Dependencies that are down become 503 (never 500); anything unexpected is
logged with its traceback and answered 500 in the same shape, without the trace.
"""

from __future__ import annotations

import logging

import redis
from apiflask import APIFlask, HTTPError
from flask import request
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import TimeoutError as PoolTimeout, DBAPIError, OperationalError
from urllib3.exceptions import HTTPError as StorageConnectionError

from nexus.jobs.submit import PayloadTooLarge, PublishError, SubmissionError

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
          429: "too_many_requests", 503: "unavailable"}


class ApiError(HTTPError):
    """Raise from a view: `ApiError(404, "job not found")`, optionally with a code and details."""

    def __init__(self, status: int, message: str, details: dict | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, detail=details or {}, headers=headers, extra_data={"code": code} if code else None)


def error_body(status: int, message: str, details=None, code: str | None = None) -> dict:
    return {"error": {"code": code or _CODES.get(status, "error"), "message": message, "details": details or {}}}


def install_error_handlers(app: APIFlask) -> None:
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
