"""How many child jobs one parent may create: one rule, checked at submit time when the payload
says how many (JobType.fan_out) and again when a running job submits them (JobContext.submit_children).

A batch of millions of one-line chunks, or a proof of millions of segments, would otherwise fill the
jobs table and the broker from a single request.
"""

from __future__ import annotations

from nexus.config import Settings


class TooManyChildren(ValueError):
    """A ValueError, so a running parent fails at once instead of retrying into the same wall."""

    def __init__(self, message: str, children: int, limit: int):
        super().__init__(message)
        self.details = {"children": children, "max_children_per_job": limit}


def check_fan_out(children: int, settings: Settings, hint: str = "") -> None:
    limit = settings.max_children_per_job
    if children > limit:
        raise TooManyChildren(f"this job would create {children} child jobs; at most {limit} per job "
                              f"(NEXUS_MAX_CHILDREN_PER_JOB){': ' + hint if hint else ''}", children, limit)
