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
"""

from __future__ import annotations

import os
import signal

from nexus.config import Settings
from nexus.queueing.celery_app import make_celery

INSPECT_INTERVAL_SECONDS = 30.0
TASK_COLUMNS = "name,args,state,received,runtime,worker,uuid"


def run_flower(settings: Settings) -> None:
    """Serve Flower on settings.flower_host:flower_port until SIGTERM."""
    from flower import command
    from flower.app import Flower
    from tornado.ioloop import PeriodicCallback

    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{settings.flower_password}"
    command.apply_env_options()
    command.apply_options("flower", [f"--address={settings.flower_host}", f"--port={settings.flower_port}",
                                     "--purge_offline_workers=60", f"--tasks_columns={TASK_COLUMNS}"])
    command.extract_settings()
    command.setup_logging()
    flower = Flower(capp=make_celery(settings), options=command.options, **command.settings)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    flower.start_http_server()
    PeriodicCallback(flower.update_workers, INSPECT_INTERVAL_SECONDS * 1000).start()
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower.stop()
