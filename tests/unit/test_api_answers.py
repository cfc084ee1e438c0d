"""The API's answer models say what the views send: a job's fields are the record's, in its order."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from nexus.api.views import JobView
from nexus.jobs.records import JOB_COLUMNS, Job


def test_the_job_answer_lists_the_records_fields_in_order():
    assert tuple(JobView.model_fields) == (*JOB_COLUMNS, "output_url")


def test_a_job_passes_through_its_answer_model_unchanged():
    now = datetime.now(timezone.utc)
    job = Job(uuid.uuid4(), "noop", "queued", 5, "default", 0, 3, {}, "cpu_only", {"echo": 1}, None, None, None,
              None, None, None, None, None, False, now, None, None, now)
    assert JobView.model_validate(job.to_json()).model_dump(mode="json", exclude={"output_url"}) == job.to_json()
