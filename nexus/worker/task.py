"""The one Celery task Nexus runs: execute a job attempt by id."""

from __future__ import annotations

import logging
import socket
from contextlib import nullcontext

import redis
from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from nexus.activity import ActivityBoard
from nexus.config import Role, Settings
from nexus.db.engine import get_engine
from nexus.jobs.notify import Notifier
from nexus.jobs.runtime import JobRunner
from nexus.jobs.submit import Submitter
from nexus.queueing.celery_app import RUN_JOB_TASK
from nexus.queueing.health import install_consumption_probe
from nexus.queueing.message import JobMessage
from nexus.replicas import make_node_reads
from nexus.storage import make_object_store
from nexus.storage.leased import lease_grants

log = logging.getLogger(__name__)


def node_name(settings: Settings) -> str:
    return settings.node_name or socket.gethostname()


def register_tasks(app: Celery, settings: Settings) -> None:
    install_consumption_probe(app, settings)  # a worker proves it consumes (nexus.queueing.health)
    # An agent's workers (it sets NEXUS_NODE_ID) mark their jobs for its heartbeat; nobody reads a lone worker's.
    board = ActivityBoard.for_settings(settings) if settings.node_id else None
    runner: list[JobRunner] = []  # built lazily in the worker process (after any fork)

    def get_runner() -> JobRunner:
        if not runner:
            engine = get_engine(settings)
            master_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
            store = make_object_store(settings)
            reads = make_node_reads(settings, engine, master_redis, store)  # master-only without NEXUS_REPLICA_*
            # A worker node holds no key to tenant data: its jobs' objects come by their leases.
            grants = lease_grants(settings, store) if settings.role is Role.WORKER else None
            runner.append(JobRunner(
                settings, engine, reads.store, Submitter(settings, engine, app), Notifier(master_redis),
                node_name(settings), reads=reads, grants=grants,
            ))
        return runner[0]

    @app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(self: Task, job_id: str, attempt: int, read_after_lsn: str | None = None) -> str:
        # The arguments are JobMessage.task_args(); older messages lack read_after_lsn.
        message = JobMessage(str(job_id), int(attempt), queue="", read_after_lsn=read_after_lsn)
        try:
            with board.running_job(message.job_id) if board else nullcontext():
                outcome = get_runner().execute(message.job_id, message.attempt, message.read_after_lsn)
        except OperationalError as exc:
            # The database is down before the claim: try again later rather than drop the message.
            delay = min(2 ** self.request.retries, 15)
            log.warning("database unavailable for job %s, retrying in %ss: %s", job_id, delay, exc)
            raise self.retry(countdown=delay, max_retries=None) from None
        log.info("job %s attempt %s: %s", job_id, attempt, outcome)
        return outcome
