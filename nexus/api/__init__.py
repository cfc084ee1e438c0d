"""The master's HTTP API: an APIFlask app factory (`api/app.py`), one blueprint per resource.

    app = create_app(settings)          # tests build their own with their own settings
    create_node_wsgi_app()              # the node API: register and heartbeat only (nexus.master)

This file imports nothing: gunicorn's arbiter loads `nexus.api.access_log` for its logger class,
and a package that built the app on import made each arbiter hold Flask, SQLAlchemy and Celery
it never calls (about 55 MiB each, bench/master_memory.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apiflask import APIFlask


def create_app(*args: Any, **kwargs: Any) -> APIFlask:
    """See `nexus.api.app.create_app`."""
    from nexus.api.app import create_app as create

    return create(*args, **kwargs)


def create_wsgi_app() -> APIFlask:
    """Entry point for gunicorn (`nexus.api:create_wsgi_app()`)."""
    from nexus.api.app import create_wsgi_app as create

    return create()


def create_node_wsgi_app() -> APIFlask:
    """Entry point for the node API's gunicorn: health and the node routes, nothing a user can hold."""
    from nexus.api.app import create_node_wsgi_app as create

    return create()
