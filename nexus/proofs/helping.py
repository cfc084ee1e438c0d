"""A waiting proof job proves its own queued segments (see nexus/proofs/jobs.py for why).

It claims a segment through the same JobRunner a worker uses (conditional claim,
lease, fenced completion), so a segment proven here is indistinguishable from
one a worker took from the broker, and the broker's message for that attempt is
dropped when it arrives.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import redis

from nexus.jobs.context import JobContext

if TYPE_CHECKING:
    from nexus.jobs.runtime import JobRunner

log = logging.getLogger(__name__)


class SegmentHelper:
    """Lets a waiting proof job prove its own queued segments, through the same runner a worker uses."""

    def __init__(self, ctx: JobContext, queue: str):
        self.ctx = ctx
        self.queue = queue

    def prove_one(self, rows: list[dict]) -> bool:
        """Claim and prove one waiting segment; False when none could be claimed."""
        for row in rows:
            # A segment that already failed on this node is left to others (the runtime would
            # decline it and publish it again, once per look: a stream of duplicate messages).
            waiting = row["state"] in ("queued", "retrying") and row["due"] and not row["failed_here"]
            if not waiting or row["queue"] != self.queue:
                continue
            self.ctx.check_cancelled()
            outcome = _helper_runner(self.ctx).execute(str(row["id"]), row["attempt"] + 1)
            if outcome not in ("dropped", "declined"):
                log.info("proof %s proved segment %s itself: %s", self.ctx.job_id, row["index"], outcome)
                return True
        return False


_runners: dict[int, "JobRunner"] = {}
_runners_lock = threading.Lock()


def _helper_runner(ctx: JobContext) -> "JobRunner":
    """One JobRunner per worker process for helping (it owns a lease-renewing thread).
    Imported late: the runtime imports the job registry, which loads this module."""
    from nexus.jobs.notify import Notifier
    from nexus.jobs.runtime import JobRunner

    with _runners_lock:
        runner = _runners.get(id(ctx.engine))
        if runner is None:
            notifier = Notifier(redis.Redis.from_url(ctx.settings.redis_url, socket_timeout=5))
            runner = JobRunner(ctx.settings, ctx.engine, ctx.node_storage or ctx.storage, ctx.submitter, notifier,
                               ctx.node, grants=ctx.grants)  # each segment's objects under its own lease
            _runners[id(ctx.engine)] = runner
        return runner
