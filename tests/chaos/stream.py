"""A stream of jobs submitted over HTTP while faults happen, and the audit that follows it.

The client retries every batch until the API answers (connection refused while
the API restarts, 503 while PostgreSQL or Redis is down), under the same
idempotency keys: a batch whose answer was lost is not submitted twice.
Each job has an expected outcome: most must succeed (some after an injected
failure), a few must fail after exactly their `max_attempts`.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import requests

from tests.support import ADMIN_TOKEN

MAX_ATTEMPTS = 8  # generous: one job may be hit by several kills in a row and must still succeed
FAILING_MAX_ATTEMPTS = 2


@dataclass
class Planned:
    key: str
    body: dict
    should_succeed: bool


def plan_jobs(count: int, seed: int, min_sleep: float = 0.05, max_sleep: float = 0.5) -> list[Planned]:
    """Mostly sleep jobs; one in 10 a noop; one in 20 fails once first; one in 25 must end failed."""
    rng = random.Random(seed)
    planned = []
    for i in range(count):
        key = f"chaos-{seed}-{i}"
        if i % 25 == 7:
            body = {"type": "noop", "payload": {"fail_attempts": 100}, "max_attempts": FAILING_MAX_ATTEMPTS}
            planned.append(Planned(key, {**body, "idempotency_key": key}, should_succeed=False))
            continue
        if i % 10 == 3:
            payload = {"echo": i}
        else:
            payload = {"seconds": round(rng.uniform(min_sleep, max_sleep), 3)}
        if i % 20 == 11:
            payload["fail_attempts"] = 1
        body = {"type": "noop" if "echo" in payload else "sleep", "payload": payload, "max_attempts": MAX_ATTEMPTS,
                "idempotency_key": key}
        planned.append(Planned(key, body, should_succeed=True))
    return planned


@dataclass
class JobStream:
    """Submits planned jobs in batches from a background thread at a steady rate."""

    url: str
    tenant: str
    planned: list[Planned]
    batch: int = 20
    per_second: float = 40.0
    deadline_seconds: float = 240.0
    token: str = ADMIN_TOKEN  # an admin submits for `tenant`; a submitter token must be that tenant's
    ids: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id, as the API acknowledged
    retried_batches: int = 0
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> "JobStream":
        self._thread = threading.Thread(target=self._run, name="job-stream", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout if timeout is not None else self.deadline_seconds)
        if self._thread.is_alive():
            raise TimeoutError(f"submission not finished: {len(self.ids)}/{len(self.planned)} acknowledged")
        if self.error is not None:
            raise self.error

    @property
    def done(self) -> int:
        return len(self.ids)

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.deadline_seconds
            for start in range(0, len(self.planned), self.batch):
                chunk = self.planned[start:start + self.batch]
                began = time.monotonic()
                self._submit(chunk, deadline)
                time.sleep(max(0.0, len(chunk) / self.per_second - (time.monotonic() - began)))
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def _submit(self, chunk: list[Planned], deadline: float) -> None:
        body = {"jobs": [{**p.body, "tenant": self.tenant} for p in chunk]}
        while True:
            answer = submit_with_retry(self.url, "/api/v1/jobs/bulk", body, deadline, self.token)
            if answer is not None:
                for planned, job in zip(chunk, answer["jobs"]):
                    self.ids[planned.key] = job["id"]
                return
            self.retried_batches += 1


def submit_with_retry(url: str, path: str, body: dict, deadline: float, token: str = ADMIN_TOKEN) -> dict | None:
    """One POST; None when it should be sent again (API down or a dependency unavailable)."""
    try:
        response = requests.post(url + path, json=body, headers={"Authorization": f"Bearer {token}"},
                                 timeout=15)
    except requests.RequestException:
        response = None
    if response is not None and response.status_code < 500:
        if response.status_code >= 400:
            raise AssertionError(f"submission refused: {response.status_code} {response.text[:500]}")
        return response.json()
    if time.monotonic() > deadline:
        raise TimeoutError(f"API still failing at the deadline: {getattr(response, 'status_code', 'no answer')}")
    time.sleep(0.3)
    return None


def canary_latency(url: str, tenant: str, timeout: float = 90) -> float:
    """Seconds until a job submitted now has succeeded: the end-to-end recovery a user sees."""
    began = time.monotonic()
    deadline = began + timeout
    body = {"type": "noop", "tenant": tenant, "idempotency_key": f"canary-{uuid.uuid4().hex}",
            "max_attempts": MAX_ATTEMPTS}
    job = None
    while job is None:
        job = submit_with_retry(url, "/api/v1/jobs", body, deadline)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    while time.monotonic() < deadline:
        try:
            view = requests.get(f"{url}/api/v1/jobs/{job['id']}?wait=5", headers=headers, timeout=10)
            if view.status_code == 200 and view.json()["state"] == "succeeded":
                return round(time.monotonic() - began, 2)
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"canary job {job['id']} did not succeed within {timeout} s")
