"""NexusClient: the Python way to use a Nexus cluster (the CLI is built on it).

    client = NexusClient("http://127.0.0.1:8000", token)
    job = client.submit("sleep", {"seconds": 1})
    done = client.wait(job["id"], timeout=60)
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

import requests

from nexus.config import Settings

FINAL_STATES = {"succeeded", "failed", "cancelled"}


class NexusError(Exception):
    """The API answered with an error: `status`, `code`, `message` and `details` say what."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class NexusClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0, rate_limit_patience: float = 60.0):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        # How long one call waits out 429 answers, as their Retry-After says, before raising. A 429 is
        # refused before anything happened (no row, no message), so any request may be sent again.
        self.rate_limit_patience = rate_limit_patience

    @classmethod
    def from_settings(cls, settings: Settings) -> "NexusClient":
        """NEXUS_URL/NEXUS_TOKEN, else the local cluster's cluster.json."""
        url, token = settings.url, settings.token
        if (not url or not token) and settings.cluster_file.exists():
            cluster = json.loads(settings.cluster_file.read_text())
            url, token = url or cluster["api_url"], token or cluster["admin_token"]
        if not token:
            raise NexusError(0, "no_token", "set NEXUS_TOKEN (or start a local cluster with `nexus dev`)")
        return cls(url or settings.public_api_url, token)

    # --- HTTP ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        waited = 0.0
        while True:
            response = self.session.request(method, self.url + path, **kwargs)
            retry_after = _retry_after(response)
            if retry_after is None or waited + retry_after > self.rate_limit_patience:
                break
            time.sleep(retry_after)  # as told: sooner, the API would refuse it again without looking
            waited += retry_after
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:500]}
            raise NexusError(response.status_code, error.get("code", "error"), error.get("message", ""),
                             error.get("details"))
        return response.json() if response.content else None

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, type: str, payload: Any = None, **fields) -> dict:
        """Submit one job; fields: requirements, priority, max_attempts, idempotency_key, input_key, tenant."""
        return self.request("POST", "/api/v1/jobs", json={"type": type, "payload": payload, **fields})

    def run(self, type: str, payload: Any = None, wait: float = 30.0, **fields) -> dict:
        """Submit one job and get it back final in the same request when it finishes within `wait`
        seconds (at most 30); otherwise as it stands then: follow it with `wait()`."""
        return self.request("POST", "/api/v1/jobs", params={"wait": wait},
                            json={"type": type, "payload": payload, **fields}, timeout=self.timeout + wait)

    def submit_many(self, jobs: list[dict]) -> list[dict]:
        """Submit up to 10,000 jobs in one transaction; returns [{id, state, created}] in order."""
        return self.request("POST", "/api/v1/jobs/bulk", json={"jobs": jobs})["jobs"]

    def get(self, job_id: str, wait: float = 0) -> dict:
        """The job; with `wait`, the server holds the request up to that many seconds until it finishes."""
        params = {"wait": wait} if wait else None
        return self.request("GET", f"/api/v1/jobs/{job_id}", params=params, timeout=self.timeout + wait)

    def list(self, **filters) -> Iterator[dict]:
        """All jobs matching state/type/tenant/parent_id, newest first, following the cursor."""
        params = {k: v for k, v in filters.items() if v is not None}
        while True:
            page = self.request("GET", "/api/v1/jobs", params=params)
            yield from page["jobs"]
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def events(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/api/v1/jobs/{job_id}/events")["events"]

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/api/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict:
        return self.request("POST", f"/api/v1/jobs/{job_id}/retry")

    def wait(self, job_id: str, timeout: float = 300.0, on_update: Callable[[dict], None] | None = None) -> dict:
        """Block until the job is final (or raise TimeoutError); `on_update` sees each new view of it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait=max(0.0, min(5.0, remaining)))
            if on_update:
                on_update(job)
            if job["state"] in FINAL_STATES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f} s")

    def upload(self, data: bytes, name: str = "input") -> str:
        """Store an input object; returns the key to pass as `input_key`."""
        return self.request("POST", "/api/v1/inputs", params={"name": name}, data=data,
                            headers={"Content-Type": "application/octet-stream"})["key"]

    # --- benchmarks ---------------------------------------------------------------------------
    def benchmark(self, model: str, batch_sizes: list[int], context_lengths: list[int], **fields) -> dict:
        """Start a throughput sweep; fields: nodes, output_tokens, repetitions, priority, node_timeout_seconds."""
        return self.request("POST", "/api/v1/benchmarks", json={"model": model, "batch_sizes": batch_sizes,
                                                                "context_lengths": context_lengths, **fields})

    def get_benchmark(self, benchmark_id: str) -> dict:
        return self.request("GET", f"/api/v1/benchmarks/{benchmark_id}")

    def benchmark_plot(self, benchmark_id: str) -> bytes:
        """The PNG of tok/s against batch size (a line per context length, a panel per node)."""
        response = self.session.get(f"{self.url}/api/v1/benchmarks/{benchmark_id}/plot", timeout=self.timeout)
        if response.status_code >= 400:
            error = response.json().get("error", {})
            raise NexusError(response.status_code, error.get("code", "error"), error.get("message", ""),
                             error.get("details"))
        return response.content

    # --- cluster --------------------------------------------------------------------------
    def health(self) -> dict:
        return requests.get(self.url + "/healthz", timeout=self.timeout).json()

    def create_token(self, name: str, role: str, tenant: str = "default", expires_in_seconds: int | None = None) -> dict:
        body = {"name": name, "role": role, "tenant": tenant}
        if expires_in_seconds is not None:
            body["expires_in_seconds"] = expires_in_seconds
        return self.request("POST", "/api/v1/tokens", json=body)

    def rotate_join_token(self) -> dict:
        return self.request("POST", "/api/v1/tokens/join/rotate")


def _retry_after(response: requests.Response) -> float | None:
    """Seconds a 429 asks the client to wait (None for any other answer)."""
    value = response.headers.get("Retry-After", "")
    return float(value) if response.status_code == 429 and value.isdigit() else None
