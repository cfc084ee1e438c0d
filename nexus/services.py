"""The connections a master or worker process holds, built once from Settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
from celery import Celery
from sqlalchemy import Engine

from nexus.config import Settings
from nexus.db.engine import autocommit, get_engine
from nexus.queueing.celery_app import make_celery
from nexus.storage import ObjectStore, make_object_store


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
        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=3)

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

        return Submitter(self.settings, self.engine, self.celery)
