"""The worker both sides of bench/dispatch.py use: Nexus's run_job task plus a bare Celery no-op.

Same process, same pool, same Redis: the only difference measured is Nexus's own work.
"""

from nexus.config import load_settings
from nexus.queueing.celery_app import make_celery
from nexus.worker.task import register_tasks

settings = load_settings()
app = make_celery(settings)
register_tasks(app, settings)


@app.task(name="bench.bare_noop", ignore_result=False, acks_late=True)
def bare_noop(echo=None):
    return {"echo": echo}
