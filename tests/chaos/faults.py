"""Small helpers the fault tests share: tenants, waiting for the stream, timing recoveries."""

from __future__ import annotations

import time
import uuid

from tests.chaos.cluster import ChaosCluster
from tests.chaos.stream import JobStream
from tests.support import wait_for


def new_tenant(fault: str) -> str:
    return f"{fault}-{uuid.uuid4().hex[:6]}"


def wait_submitted(stream: JobStream, count: int, timeout: float = 120) -> None:
    """Until the stream has `count` jobs acknowledged (the moment to inject the next fault)."""
    deadline = time.monotonic() + timeout
    while stream.done < count:
        if stream.error is not None:
            raise stream.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {stream.done}/{count} jobs submitted after {timeout} s")
        time.sleep(0.05)


def fault_points(total: int, repeats: int) -> list[int]:
    """Where in the stream (jobs acknowledged) each repetition of a fault happens: spread over its middle."""
    return [int(total * (k + 1) / (repeats + 2)) for k in range(repeats)]


def wait_running_on(cluster: ChaosCluster, node: str, tenant: str, timeout: float = 5) -> list:
    """Ids of the tenant's jobs running on `node`, waiting (bounded) until there is at least one."""
    deadline = time.monotonic() + timeout
    while True:
        ids = cluster.running_on(node, tenant)
        if ids or time.monotonic() > deadline:
            return ids
        time.sleep(0.05)


def busiest_worker(cluster: ChaosCluster, tenant: str, timeout: float = 10) -> str:
    """The plain worker running the most of the tenant's jobs, waiting (bounded) until one runs any."""
    def busiest() -> str | None:
        running = {name: len(cluster.running_on(name, tenant)) for name in cluster.worker_names}
        name = max(running, key=running.__getitem__)
        return name if running[name] else None
    return wait_for(busiest, timeout=timeout, interval=0.05, what="a worker running the stream's jobs")


def seconds_until_final(cluster: ChaosCluster, job_ids: list, since: float, timeout: float = 60) -> float | None:
    """From `since` (time.time()) until all these jobs are final: how long lost work took to be redone."""
    if not job_ids:
        return None
    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.query("SELECT state, finished_at FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))",
                             {"ids": [str(i) for i in job_ids]})
        if rows and all(r["finished_at"] is not None for r in rows):
            return round(max(r["finished_at"].timestamp() for r in rows) - since, 2)
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs {job_ids} not final {timeout} s after the fault")
        time.sleep(0.1)


def claims_after(cluster: ChaosCluster, tenant: str, since: float) -> dict[str, int]:
    """Claims per worker after `since`: a worker that claims nothing after a broker restart stopped consuming."""
    rows = cluster.query(
        "SELECT e.node, count(*) AS n FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.tenant = :t "
        "AND e.to_state = 'running' AND e.at > to_timestamp(:since) GROUP BY e.node", {"t": tenant, "since": since})
    return {r["node"]: r["n"] for r in rows}


def summary(values: list[float]) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return {}
    return {"median": values[len(values) // 2], "max": values[-1]}
