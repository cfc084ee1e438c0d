"""The API under gunicorn's gevent worker: a greenlet per open request, not a thread.

Why gevent and not an async gateway beside Flask: the submission API stays
Flask, and /v1 shares its auth, catalog and submission code unchanged; what
held a thread per stream was only waiting (an XREAD on the job's Redis stream,
a PostgreSQL poll), and under gevent every such wait yields to the hub. The
gevent worker monkey-patches the standard library (sockets, threading, time)
before it loads the app, so redis-py, kombu (Celery's publisher) and the
minio SDK become cooperative as they are. psycopg2 is a C extension that the
patching cannot reach: psycogreen installs its wait callback, so a query waits
on the hub instead of blocking every greenlet of the process.

Measured on the shared 2-core dev machine (load 2-7), one API process,
`python bench/inference.py --idle-streams 2000 --idle-seconds 20 --idle-gap 5`
(one token per stream every 5 s for 20 s, all 2,000 opened at once):
- Before the process's Redis pool was a blocking one sized for every request,
  redis-py's default pool (100) refused the 101st XREAD: 100 of 2,000 finished,
  the rest 503, /healthz max 8.2 s with 20 of 35 probes failing.
- With it and the token cache (nexus.api.security): 1,368 of 2,000; the 632
  others waited 30 s for one of the database pool's 30 connections (catalog
  read and job insert per request); /healthz p50 31 ms, max 10 s.
- With the /v1 catalog entry cached as well (one checkout per request, the
  insert): 2,000 of 2,000, no errors; RSS 341 MiB at rest, 431 MiB peak, about
  46 KiB per open stream; 54% of a core over 76 s; /healthz p50 40 ms, max
  4.7 s (the opening burst), 53 probes all 200. The load was lower in this run
  (1.2 against 2.2), so part of the gain may be the machine's.
gthread's 16 threads capped a process at 16 streams (64 with four workers),
and each thread held 8 MiB of virtual stack.

    gunicorn --worker-class gevent "nexus.api.green:create_green_wsgi_app()"
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def make_psycopg_green() -> bool:
    """Let psycopg2 wait through gevent's hub when this process runs under gevent; True if it does."""
    try:
        from gevent import monkey
    except ImportError:  # no gevent: a plain threaded server, psycopg2 stays blocking, which is right there
        return False
    if not monkey.is_module_patched("socket"):
        return False
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
    return True


def create_green_wsgi_app():
    """Entry point for gunicorn's gevent worker: the Flask app, psycopg2 made cooperative first."""
    from nexus.api import create_wsgi_app
    from nexus.api.refusals import RefusalGate

    app = create_wsgi_app()
    if make_psycopg_green():
        log.info("API on gevent: psycopg2 waits cooperatively (psycogreen)")
        if isinstance(app.wsgi_app, RefusalGate):  # a delayed refusal is a sleeping greenlet, not a thread
            app.wsgi_app.max_delayed = max(1, app.extensions["nexus_settings"].api_worker_connections // 4)
    else:
        log.warning("API not under gevent: every open stream holds a thread")
    return app
