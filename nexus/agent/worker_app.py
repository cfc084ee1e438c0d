"""The Celery app of the agent's workers: the platform's worker app, plus the activity board.

`celery -A nexus.agent.worker_app worker` runs the same tasks as any Nexus
worker; the two signal handlers below mark each running job on the node's
activity board, which the agent reads for its heartbeat.
"""

from celery.signals import task_postrun, task_prerun

from nexus.agent.activity import ActivityBoard
from nexus.queueing.worker_app import app, settings

__all__ = ["app"]

board = ActivityBoard.for_settings(settings)


@task_prerun.connect
def _job_started(task_id=None, task=None, args=(), **_) -> None:
    if args:
        board.job_started(str(args[0]))  # run_job(job_id, attempt, ...)


@task_postrun.connect
def _job_finished(task_id=None, task=None, args=(), **_) -> None:
    if args:
        board.job_finished(str(args[0]))
