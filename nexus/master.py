"""Master start-up: database, migrations, buckets and the bootstrap admin token, then the API."""

from __future__ import annotations

import logging
import os
import shutil
import sys

from nexus.auth import ensure_bootstrap_admin
from nexus.config import Settings
from nexus.db.migrate import ensure_database, upgrade_head
from nexus.services import Services

log = logging.getLogger(__name__)


def prepare_master(settings: Settings) -> None:
    """Idempotent: safe to run on every start and from several masters at once."""
    services = Services(settings)
    try:
        ensure_database(settings.database_url)
    except Exception as exc:  # a managed database may not let us connect to `postgres`; it exists then
        log.info("not creating the database (%s); assuming it exists", exc)
    upgrade_head(services.engine)
    services.store.ensure_buckets(settings.buckets)
    ensure_bootstrap_admin(services.engine, settings.admin_token)
    log.info("master ready: migrations applied, buckets %s present", ", ".join(settings.buckets))


def exec_api_server(settings: Settings, workers: int) -> None:
    """Replace this process with gunicorn serving the API on its gevent worker (see nexus/api/green.py).

    A streaming /v1 request or a long-poll waits on Redis or PostgreSQL for its whole life; on
    gevent each is a greenlet (tens of KiB) instead of an OS thread, so one process holds thousands.
    """
    gunicorn = shutil.which("gunicorn") or os.path.join(os.path.dirname(sys.executable), "gunicorn")
    argv = [gunicorn, "--bind", f"{settings.api_host}:{settings.api_port}", "--workers", str(workers),
            "--worker-class", "gevent", "--worker-connections", str(settings.api_worker_connections),
            "--timeout", "120", "--graceful-timeout", "10",
            "--access-logfile", "-", "--access-logformat", '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
            "nexus.api.green:create_green_wsgi_app()"]
    os.execv(gunicorn, argv)
