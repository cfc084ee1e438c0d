"""The API's app factory: the APIFlask app with its hooks and one blueprint per resource."""

from __future__ import annotations

import logging

from apiflask import APIFlask
from flask import request

import nexus
from nexus.api.errors import ApiError, install_error_handlers
from nexus.api.intake import IntakeTurns
from nexus.api.limits import Slots, install_rate_limit, install_refusal_gate
from nexus.api.models import ModelNameConverter
from nexus.api.refusals import LONG_POLL, STREAM
from nexus.api.security import TokenCache, authenticate_request
from nexus.config import Settings, load_settings
from nexus.services import Services


def create_app(settings: Settings | None = None, services: Services | None = None,
               blueprints=None, auth_cache_seconds: float | None = None) -> APIFlask:
    settings = settings or load_settings()
    app = APIFlask("nexus", title="Nexus API", version=nexus.__version__, docs_path="/docs")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,  # JSON bodies; uploads raise it (api/inputs.py)
        VALIDATION_ERROR_STATUS_CODE=400,
        JSON_SORT_KEYS=False,
    )
    app.security_schemes = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.url_map.converters["model_name"] = ModelNameConverter
    app.extensions["nexus"] = services or Services(settings)
    app.extensions["nexus_settings"] = settings
    install_error_handlers(app)
    app.before_request(authenticate_request)
    app.before_request(refuse_json_that_is_not_an_object)
    app.extensions["nexus_token_cache"] = TokenCache(
        settings.auth_cache_seconds if auth_cache_seconds is None else auth_cache_seconds)
    # Behind the refusal gate: a refused token's requests take no turn.
    app.wsgi_app = IntakeTurns(app.wsgi_app, settings.api_intake_turns,  # type: ignore[method-assign]
                               settings.inference_admission_wait_seconds)
    refusals = install_refusal_gate(app)  # before everything: a token refused a moment ago is answered at once
    install_rate_limit(app, settings)  # after authentication: it counts per token
    redis = app.extensions["nexus"].redis
    app.extensions["nexus_slots"] = {kind: Slots(redis, kind, refusals) for kind in (LONG_POLL, STREAM)}
    for blueprint in blueprints or _blueprints():
        app.register_blueprint(blueprint)
    if "openai" in app.blueprints:
        from nexus.api.openai import document_bodies

        app.spec_callback = document_bodies  # the /v1 bodies' pydantic models in /openapi.json
    return app


def refuse_json_that_is_not_an_object() -> None:
    """Every JSON body /api/v1 takes is an object: `null`, a list or a number is a 400 before any view
    reads it (a view whose fields all have defaults would otherwise take `null` for `{}`). /v1 answers
    in OpenAI's error shape and checks its own bodies. A job's object written through its lease
    (api/leases.py) is stored as it came, streamed: any bytes, and not read here."""
    if request.method in ("POST", "PUT", "PATCH") and request.path.startswith("/api/") and request.is_json \
            and request.content_length and request.blueprint != "leases":
        body = request.get_json(silent=True)
        if not isinstance(body, dict) and (body is not None or request.get_data().strip() == b"null"):
            raise ApiError(400, "the body must be a JSON object", {"body": type(body).__name__})


def _blueprints():
    from nexus.api import health, inputs, jobs, tokens
    from nexus.api import cluster, gpu, nodes  # the node agent's routes
    from nexus.api import proofs  # proof jobs: receipts, verification, proven weight
    from nexus.api import models, openai  # model catalog and instances, the OpenAI-compatible /v1
    from nexus.api import benchmarks  # throughput sweeps per node, their plots
    from nexus.api import console  # the web console's static files under /ui/
    from nexus.api import leases  # a running job's objects, for the worker holding its lease

    return [health.bp, jobs.bp, inputs.bp, tokens.bp, nodes.bp, gpu.bp, cluster.bp, proofs.bp,
            models.bp, openai.bp, benchmarks.bp, console.bp, leases.bp]


def create_wsgi_app() -> APIFlask:
    """Entry point for gunicorn (`nexus.api:create_wsgi_app()`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app()


def create_node_wsgi_app() -> APIFlask:
    """Entry point for the node API's gunicorn: health and the node routes, nothing a user can hold."""
    from nexus.api import health, nodes

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # No token cache: a node's token revoked stops its heartbeats at once, and a beat per node every
    # few seconds is no crowd for the database pool.
    return create_app(blueprints=[health.bp, nodes.bp], auth_cache_seconds=0)
