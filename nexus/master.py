"""Master start-up: database, migrations, buckets and the bootstrap admin and join tokens, then the API servers.

`nexus master` prepares in a child process (`python -m nexus.master`) and then watches the two
gunicorns: the migrations and the ORM stay out of the process that lives on. With `--reconciler`,
`--flower` and `--node-api-in-process` that process also runs the reconciler, Flower and the node
API, in threads (docs/ARCHITECTURE.md, "The master at rest"): a process of its own costs each about
40 MiB of interpreter, settings and Celery before it does anything, and the watcher held those anyway.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading

from nexus.config import Settings, load_server_settings

log = logging.getLogger(__name__)


def prepare_master(settings: Settings) -> None:
    """Idempotent: safe to run on every start and from several masters at once."""
    from nexus.auth import ensure_bootstrap_admin, ensure_bootstrap_join
    from nexus.db.migrate import ensure_database, upgrade_head
    from nexus.jobs.worker_role import install_worker_role
    from nexus.models.catalog import WORKER_INSTANCE_WRITES
    from nexus.services import Services

    services = Services(settings)
    try:
        ensure_database(settings.database_url)
    except Exception as exc:  # a managed database may not let us connect to `postgres`; it exists then
        log.info("not creating the database (%s); assuming it exists", exc)
    upgrade_head(services.engine)
    install_worker_role(services.engine, settings, WORKER_INSTANCE_WRITES)
    services.store.ensure_buckets(settings.buckets)
    ensure_bootstrap_admin(services.engine, settings.admin_token)
    ensure_bootstrap_join(services.engine, settings.join_token)
    log.info("master ready: migrations applied, worker role installed, buckets %s present",
             ", ".join(settings.buckets))


def prepare_in_child() -> int:
    """prepare_master in a process of its own, with the settings this one found; its exit status."""
    return subprocess.run([sys.executable, "-m", "nexus.master"]).returncode


# The node API carries only register and heartbeat: about 2.6 ms of CPU per beat (bench/heartbeat.py),
# so one process keeps up with a thousand nodes beating every 5 s; threads cover slow database moments.
NODE_API_WORKERS = 1
NODE_API_THREADS = 8


def _gunicorn_argv(app: str, host: str, port: int, workers: int, worker_args: list[str]) -> list[str]:
    gunicorn = shutil.which("gunicorn") or os.path.join(os.path.dirname(sys.executable), "gunicorn")
    return [gunicorn, "--bind", f"{host}:{port}", "--workers", str(workers), *worker_args,
            "--timeout", "120", "--graceful-timeout", "10",
            "--access-logfile", "-", "--access-logformat", '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
            "--logger-class", "nexus.api.access_log.AccessLogger",  # no ?token= in the log
            "--no-control-socket",  # unused; its default path is one per user, so two servers would share it
            app]


def user_api_argv(settings: Settings, workers: int) -> list[str]:
    """The user API on gunicorn's gevent worker (see nexus/api/green.py).

    A streaming /v1 request or a long-poll waits on Redis or PostgreSQL for its whole life; on
    gevent each is a greenlet (tens of KiB) instead of an OS thread, so one process holds thousands.
    """
    return _gunicorn_argv("nexus.api.green:create_green_wsgi_app()", settings.api_host, settings.api_port, workers,
                          ["--worker-class", "gevent", "--worker-connections", str(settings.api_worker_connections)])


def node_api_argv(settings: Settings) -> list[str]:
    """The node API on threads: its requests answer in milliseconds and none of them waits long."""
    return _gunicorn_argv("nexus.api:create_node_wsgi_app()", settings.api_host, settings.node_api_port,
                          NODE_API_WORKERS, ["--worker-class", "gthread", "--threads", str(NODE_API_THREADS)])


def api_servers(settings: Settings, workers: int, node_api: bool = True) -> list[list[str]]:
    """The user API, and the node API beside it on a listener and process of its own.

    Why a second gunicorn: on the threaded server a request thread was held for the
    whole of a long-poll (`?wait=30`) or a stream, so one token with 64 long-polls
    held all 16 threads, /healthz and every heartbeat queued behind them for 100 s,
    and nodes went offline. The user API now waits on greenlets, but a separate
    process still gives the beats their own database pool and their own GIL (token
    streaming is CPU work in the API process), and its routes are only register and
    heartbeat, which answer in milliseconds, so no user request can hold them.
    Alternatives weighed: a second listener in the same gunicorn shares its workers;
    a custom worker routing by listener depends on gunicorn's internals and still
    shares the GIL and the pool; heartbeats as direct database writes would give
    every agent a database login (docs/ARCHITECTURE.md, "Roles hold only what they
    need"). Cost: one more process (~60 MB), which `--node-api-in-process` saves by serving the
    node API from the watching process instead (node_api_threads), still apart from user requests.
    """
    # Each through orphan_guard: SIGTERM if this process dies. The user API at settings.api_nice: when a
    # tenant's burst saturates the CPUs, the node API and the watcher get about three times its share
    # (docs/ARCHITECTURE.md, "Liveness from the work", says what that did and did not bound).
    guard = [sys.executable, "-m", "nexus.agent.orphan_guard"]
    servers = [[*guard, "--nice", str(settings.api_nice), *user_api_argv(settings, workers)]]
    if settings.node_api_port and node_api:
        servers.append([*guard, *node_api_argv(settings)])
    return servers


def run_reconciler(settings: Settings, stop: threading.Event) -> None:
    """The reconciler's passes (nexus/jobs/reconciler.py) every few seconds until `stop` is set."""
    from functools import partial

    from nexus.jobs.reconciler import Reconciler
    from nexus.models.ray_clusters import reconcile_multi_node
    from nexus.services import Services

    # Its own Redis ACL user where it has one: the watching process itself reaches Redis as the API's.
    services = Services(settings.model_copy(update={"redis_url": settings.reconciler_redis_url}))
    # Multi-node instances that lost a member: to error, then placed again.
    multi_node = partial(reconcile_multi_node, services.engine, services.settings)
    Reconciler(services.settings, services.engine, services.celery, services.redis, [multi_node]).run_forever(stop)


def node_api_threads(settings: Settings, stop: threading.Event) -> list[threading.Thread]:
    """The node API (register, heartbeat) on waitress in this process: a listener thread and a pool of
    NODE_API_THREADS, as its gunicorn had; keep-alive connections wait in waitress's event loop, not
    in a thread each. The second thread closes the server when `stop` is set."""
    from waitress import create_server

    from nexus.api import create_node_wsgi_app

    server = create_server(create_node_wsgi_app(), host=settings.api_host, port=settings.node_api_port,
                           threads=NODE_API_THREADS, ident="nexus", clear_untrusted_proxy_headers=True)

    def close_when_asked() -> None:
        stop.wait()
        server.close()
        for channel in list(server._map.values()):  # open keep-alive connections keep the loop running
            channel.close()
        server.task_dispatcher.shutdown(timeout=5)

    def serve() -> None:
        try:
            server.run()
        except (OSError, ValueError):  # the listener closed under the loop while stopping
            if not stop.is_set():
                raise

    threads = [threading.Thread(target=serve, name="node-api", daemon=True),
               threading.Thread(target=close_when_asked, name="node-api-closer", daemon=True)]
    for thread in threads:
        thread.start()
    return threads[:1]


def companion_threads(settings: Settings, stop: threading.Event, reconciler: bool, flower: bool,
                      node_api: bool = False) -> list[threading.Thread]:
    """The reconciler, Flower and the node API as threads of the watching process, when asked for.

    Sound beside the watcher, not beside the user API: the user API is its gunicorn, a child
    process, so a tenant stalling it stalls neither the reconciler nor the heartbeats ("Liveness
    from the work"). The reconciler waits on PostgreSQL and Redis for nearly all of a pass, Flower
    on its sockets, and a beat is milliseconds of CPU; none holds the GIL for long.
    """
    threads = node_api_threads(settings, stop) if node_api and settings.node_api_port else []
    if reconciler:
        thread = threading.Thread(target=run_reconciler, args=(settings, stop), name="reconciler", daemon=True)
        thread.start()
        threads.append(thread)
    if flower:
        from nexus.queueing.monitor import flower_thread

        threads.append(flower_thread(settings, stop))
    return threads


def serve_api(settings: Settings, workers: int, reconciler: bool = False, flower: bool = False,
              node_api_in_process: bool = False) -> int:
    """Run both servers (and the companions asked for) until asked to stop or until one exits; then
    stop the others and return.

    Either server gone, or a companion thread, is the master gone: the exit lets the container's
    restart policy (or `nexus dev`'s supervisor) start all again, rather than running half a master.
    """
    children = [subprocess.Popen(argv) for argv in api_servers(settings, workers, node_api=not node_api_in_process)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # After the children: they inherit nothing of it.
    threads = companion_threads(settings, stop, reconciler, flower, node_api=node_api_in_process)
    while not stop.wait(0.5) and all(child.poll() is None for child in children) \
            and all(thread.is_alive() for thread in threads):
        pass
    ended = [thread.name for thread in threads if not thread.is_alive()]
    stopped_by_signal = stop.is_set()
    stop.set()  # the companions end their loops
    exited = [child.returncode for child in children if child.poll() is not None]
    for child in children:
        if child.poll() is None:
            child.terminate()  # gunicorn's graceful stop: in-flight requests finish within --graceful-timeout
    for child in children:
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
    for thread in threads:
        thread.join(10)
    if ended and not stopped_by_signal:
        log.error("the master's %s thread ended; stopping the API servers", ", ".join(ended))
        return 1
    if exited and not stopped_by_signal:
        log.error("an API server exited (%s); stopping the other", exited)
        return exited[0] or 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_master(load_server_settings())
