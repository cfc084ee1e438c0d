"""After a fault: is every job final, with the outcome it should have, recorded once, its story intact?"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from nexus.queueing import broker
from tests.chaos.cluster import ChaosCluster
from tests.chaos.stream import JobStream

FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Report:
    fault: str
    submitted: int
    succeeded: int
    failed_as_planned: int
    retried: int  # jobs that needed more than one attempt
    duplicates: int  # jobs with more than one recorded completion (must be 0)
    lost: int  # acknowledged jobs missing or not final (must be 0)
    settle_s: float  # from the end of the fault to every job final
    recovery_s: dict = field(default_factory=dict)  # what "recovered" means differs per fault; named here

    def line(self) -> str:
        recovery = " ".join(f"{k}={v}" for k, v in self.recovery_s.items())
        return (f"{self.fault}: submitted={self.submitted} succeeded={self.succeeded} "
                f"failed_as_planned={self.failed_as_planned} retried={self.retried} duplicates={self.duplicates} "
                f"lost={self.lost} settle_s={self.settle_s} {recovery}")

    def as_dict(self) -> dict:
        return asdict(self)


def wait_all_final(cluster: ChaosCluster, tenant: str, expected: int, timeout: float = 120) -> float:
    """Seconds until `expected` jobs of the tenant exist and all are final; raises with the stragglers if not."""
    began = time.monotonic()
    deadline = began + timeout
    while True:
        rows = cluster.query("SELECT state, count(*) AS n FROM jobs WHERE tenant = :t GROUP BY state", {"t": tenant})
        counts = {r["state"]: r["n"] for r in rows}
        if sum(counts.values()) >= expected and all(state in FINAL for state in counts):
            return round(time.monotonic() - began, 2)
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not final after {timeout} s: {counts}; {stragglers(cluster, tenant)}")
        time.sleep(0.25)


def stragglers(cluster: ChaosCluster, tenant: str) -> str:
    """The jobs not final, each with where its message is (queue list, held by a worker, or nowhere) and its
    events: what a failure of wait_all_final needs to tell a lost message from a job nobody published."""
    rows = cluster.query("SELECT id, state, attempt, published_attempt, published_at, not_before, node, queue, "
                         "cancel_requested, updated_at, now() AS db_now FROM jobs "
                         "WHERE tenant = :t AND state NOT IN ('succeeded','failed','cancelled') LIMIT 10", {"t": tenant})
    client = cluster.services.redis
    held = broker.held_jobs(client)
    queues = {row["queue"] for row in rows}  # each queue read once, however many of its jobs are stuck
    present = {queue: broker.job_messages(client, queue) for queue in queues}
    depths = {queue: broker.queue_depth(client, queue) for queue in queues}
    lines = []
    for row in rows:
        pair, queue = (str(row["id"]), row["attempt"] + 1), row["queue"]
        where = [place for place, found in (("queue", pair in present[queue]),
                                            ("held", pair in held.get(queue, set()))) if found]
        events = cluster.query("SELECT at, from_state, to_state, attempt, node, message FROM job_events "
                               "WHERE job_id = :id ORDER BY id", {"id": row["id"]})
        lines.append(f"{dict(row)} message: {where or 'none'}; depth {depths[queue]}; "
                     f"events {[tuple(e.values()) for e in events]}")
        lines += _log_lines(cluster, str(row["id"]))
    failed_passes = [line for line in cluster.reconciler.log_text().splitlines() if "reconcile pass failed" in line]
    lines.append(f"reconciler: {len(failed_passes)} failed passes, the last: {failed_passes[-3:]}")
    return "\n".join(lines)


def _log_lines(cluster: ChaosCluster, job_id: str, most: int = 8) -> list[str]:
    """The last lines of the cluster's logs that name the job (declines, republishes, claims)."""
    found = [f"  {path.stem}: {line[:300]}" for path in sorted(cluster.logs.glob("**/*.log"))
             for line in path.read_text(errors="replace").splitlines() if job_id in line]
    return found[-most:]


def audit(cluster: ChaosCluster, stream: JobStream, fault: str, settle_s: float, recovery_s: dict) -> Report:
    """Check every invariant over the tenant's jobs and their event log; returns the counts."""
    should_succeed = {stream.ids[p.key]: p.should_succeed for p in stream.planned if p.key in stream.ids}
    jobs = {str(r["id"]): r for r in cluster.query(
        "SELECT id, state, attempt, max_attempts FROM jobs WHERE tenant = :t", {"t": stream.tenant})}
    events = defaultdict(list)
    for e in cluster.query("SELECT e.job_id, e.from_state, e.to_state, e.attempt, e.message FROM job_events e "
                           "JOIN jobs j ON j.id = e.job_id WHERE j.tenant = :t ORDER BY e.id", {"t": stream.tenant}):
        events[str(e["job_id"])].append(e)

    assert len(stream.ids) == len(stream.planned), "the stream did not submit everything"
    assert set(jobs) == set(should_succeed), "the tenant's jobs are not exactly the acknowledged ones (a repeat " \
                                             "created a second job, or an acknowledged job vanished)"
    lost = [j for j in should_succeed if j not in jobs or jobs[j]["state"] not in FINAL]
    wrong = {j: jobs[j]["state"] for j, ok in should_succeed.items()
             if j in jobs and jobs[j]["state"] != ("succeeded" if ok else "failed")}
    duplicates = [j for j, evs in events.items() if sum(e["to_state"] == "succeeded" for e in evs) > 1]
    over = {j: (r["attempt"], r["max_attempts"]) for j, r in jobs.items() if r["attempt"] > r["max_attempts"]}
    broken = {j: problem for j in jobs if (problem := story_problem(jobs[j], events[j]))}
    assert not lost, f"lost jobs: {lost[:10]}"
    assert not wrong, f"jobs with the wrong outcome: {dict(list(wrong.items())[:10])}"
    assert not duplicates, f"jobs completed twice: {duplicates[:10]}"
    assert not over, f"attempts past max_attempts: {dict(list(over.items())[:10])}"
    assert not broken, f"event logs that do not tell the story: {dict(list(broken.items())[:5])}"
    return Report(
        fault=fault, submitted=len(jobs), succeeded=sum(r["state"] == "succeeded" for r in jobs.values()),
        failed_as_planned=sum(r["state"] == "failed" for r in jobs.values()),
        retried=sum(r["attempt"] > 1 for r in jobs.values()), duplicates=len(duplicates), lost=len(lost),
        settle_s=settle_s, recovery_s=recovery_s,
    )


def story_problem(job: dict, events: list[dict]) -> str | None:
    """The event log must replay to the job's row: submitted first, each step starting where the last ended,
    one claim (-> running) per attempt, ending in the job's state."""
    if not events or events[0]["from_state"] is not None or events[0]["to_state"] != "queued":
        return "does not start with the submission"
    for before, after in zip(events, events[1:]):
        if after["from_state"] != before["to_state"]:
            return f"{before['to_state']} is followed by a step from {after['from_state']}"
    if events[-1]["to_state"] != job["state"]:
        return f"ends in {events[-1]['to_state']} but the job is {job['state']}"
    claims = [e["attempt"] for e in events if e["to_state"] == "running"]
    if claims != list(range(1, job["attempt"] + 1)):
        return f"claims for attempts {claims}, job at attempt {job['attempt']}"
    return None


def events_with(cluster: ChaosCluster, tenant: str, message: str) -> list:
    """Events of the tenant's jobs whose message starts with `message` (e.g. 'lease expired')."""
    return cluster.query("SELECT e.job_id, e.attempt, e.node, e.to_state FROM job_events e JOIN jobs j "
                         "ON j.id = e.job_id WHERE j.tenant = :t AND e.message LIKE :m",
                         {"t": tenant, "m": message + "%"})
