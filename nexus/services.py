"""The connections a master or worker process holds, built once from Settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
from celery import Celery
from sqlalchemy import Engine

from nexus.config import Settings
from nexus.db.engine import autocommit, get_engine
from nexus.queueing.celery_app import PUBLISH_GIVE_UP_SECONDS, make_celery
from nexus.storage import ObjectStore, make_object_store


REDIS_POOL_MARGIN = 64  # background threads: stream flusher, ended-jobs watcher, heartbeats, admission wake-ups
REDIS_POOL_WAIT_SECONDS = 10.0  # longer than a stream's XREAD block (1 s), so a waiter gets a connection


def redis_pool(settings: Settings, **options) -> redis.BlockingConnectionPool:
    """A blocking pool sized for every open request of an API process (or a worker's request threads)."""
    return redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.api_worker_connections + REDIS_POOL_MARGIN,
        timeout=REDIS_POOL_WAIT_SECONDS, **options)


@dataclass
class Services:
    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        return get_engine(self.settings)

    @cached_property
    def statements(self) -> Engine:
        """For reads and single-statement writes: each statement commits on its own, one round trip
        instead of three (BEGIN, the statement, COMMIT or ROLLBACK). Reads lose nothing: under READ
        COMMITTED every statement takes its own snapshot anyway. Never for work that must be atomic."""
        return autocommit(self.engine)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        """One pool per process that waits for a free connection instead of refusing.

        redis-py's ConnectionPool allows 100 connections and raises "Too many connections" at the
        101st. On the gevent API every open /v1 stream holds one in its blocking XREAD, so 2,000 idle
        streams got 1,900 answers of 503. The pool holds as many as the process holds requests
        (Settings.api_worker_connections, plus its background threads), and past that a caller
        waits up to REDIS_POOL_WAIT_SECONDS for one to come back.
        """
        return redis.Redis(connection_pool=redis_pool(self.settings), socket_timeout=5, socket_connect_timeout=3)

    @cached_property
    def admission(self):
        """Slots of the models' serving instances, taken by /v1 requests (nexus/models/admission.py)."""
        from nexus.models.admission import Admission

        return Admission(self.redis, default_slots=self.settings.inference_concurrency)

    @cached_property
    def store(self) -> ObjectStore:
        return make_object_store(self.settings)

    @cached_property
    def submitter(self):
        from nexus.jobs.submit import Submitter

        return Submitter(self.settings, self.engine, self.celery, self.broker)

    @cached_property
    def broker(self) -> redis.Redis | None:
        """A client of the broker's Redis for publishing job messages without kombu's producer
        (nexus.queueing.message.redis_envelope), which gives up on an unreachable broker as soon as
        kombu's publisher did (PUBLISH_GIVE_UP_SECONDS); None when the broker is not Redis."""
        url = self.celery.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        wait = PUBLISH_GIVE_UP_SECONDS / 2
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=self.settings.api_worker_connections + REDIS_POOL_MARGIN, timeout=wait,
            socket_timeout=wait, socket_connect_timeout=wait))
