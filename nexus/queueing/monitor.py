"""Flower on the Nexus Celery app: the cluster as Flower's users expect to see it.

Started with the app (not a bare broker URL), Flower's broker page reads the real queue lengths:
the tier queues the app declares, the model and worker queues the workers report, each summed over
the app's priority steps under its key separator. Flower asks the workers what they consume once at
start, when a fresh cluster's workers are not up yet, and again only when someone presses Refresh;
here it asks again every `INSPECT_INTERVAL_SECONDS`, so workers that join later, and the queues they
consume, show without a click. The task list shows each task's arguments, where a `nexus.run_job` run
carries its job id and attempt (JobMessage's argsrepr), so a job is found in it by id.

Secrets never reach the command line (`ps` shows it to every user): the broker URL travels inside the
app, the basic-auth credentials through Flower's own environment variable.

`nexus flower` serves it in a process of its own; `nexus master --flower` (what `nexus dev` runs) in a
thread of the master's watching process, on an event loop of its own (`flower_thread`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import TYPE_CHECKING

from nexus.config import Settings
from nexus.queueing.celery_app import make_celery

if TYPE_CHECKING:
    from flower.app import Flower

INSPECT_INTERVAL_SECONDS = 30.0
TASK_COLUMNS = "name,args,state,received,runtime,worker,uuid"


def make_flower(settings: Settings) -> Flower:
    """Flower on the Nexus app, its options applied, not yet serving; in the thread whose event loop it uses."""
    from flower import command
    from flower.app import Flower

    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{settings.flower_password}"
    command.apply_env_options()
    command.apply_options("flower", [f"--address={settings.flower_host}", f"--port={settings.flower_port}",
                                     "--purge_offline_workers=60", f"--tasks_columns={TASK_COLUMNS}"])
    command.extract_settings()
    command.setup_logging()
    return Flower(capp=make_celery(settings), options=command.options, **command.settings)


def _serve(flower: Flower, stop: threading.Event | None = None) -> None:
    from tornado.ioloop import PeriodicCallback

    flower.start_http_server()
    PeriodicCallback(flower.update_workers, INSPECT_INTERVAL_SECONDS * 1000).start()
    if stop is not None:
        def stop_when_asked() -> None:
            if stop.is_set():
                flower.stop()

        PeriodicCallback(stop_when_asked, 500).start()
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower.stop()


def run_flower(settings: Settings) -> None:
    """Serve Flower on settings.flower_host:flower_port until SIGTERM."""
    from flower import command

    flower = make_flower(settings)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    _serve(flower)


def flower_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    """Flower in a thread of the calling process (`nexus master --flower`), on an event loop of its own,
    until `stop` is set. Started after the process's children: the basic-auth variable it sets stays here."""
    def serve() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        _serve(make_flower(settings), stop)

    thread = threading.Thread(target=serve, name="flower", daemon=True)
    thread.start()
    return thread
