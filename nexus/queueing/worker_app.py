"""The Celery app a worker process runs (`celery -A nexus.queueing.worker_app worker`)."""

from nexus.config import load_settings
from nexus.queueing.celery_app import make_celery
from nexus.queueing.tasks import register_tasks

settings = load_settings()
app = make_celery(settings)
register_tasks(app, settings)
