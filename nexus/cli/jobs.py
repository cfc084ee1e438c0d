"""Commands that use the API through NexusClient: submit, jobs, job, token."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nexus.client import NexusClient, NexusError
from nexus.config import load_settings
from nexus.jobs.states import JobState

console = Console()
status_console = Console(stderr=True)  # human notes beside a JSON answer: stdout stays one document

# `--json` on a command that prints data: one JSON document on stdout, for scripts and `| jq`.
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def client() -> NexusClient:
    try:
        return NexusClient.from_settings(load_settings())
    except NexusError as exc:
        raise click.ClickException(exc.message) from None


def _json_arg(value: str | None, what: str):
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not JSON: {exc}") from None


def _fail(exc: NexusError) -> None:
    raise click.ClickException(f"{exc.message} {json.dumps(exc.details) if exc.details else ''}".strip())


@click.command("submit")
@click.argument("job_type")
@click.option("-p", "--payload", help="Payload as JSON.")
@click.option("-r", "--requirements", help='Requirements as JSON, e.g. \'{"tier": "gpu_peer"}\'.')
@click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True)
@click.option("--idempotency-key", default=None)
@click.option("-w", "--wait", is_flag=True, help="Wait for the result with a progress bar.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait with --wait.")
@json_option
def submit_cmd(job_type, payload, requirements, priority, idempotency_key, wait, timeout, as_json):
    """Submit a job, e.g. `nexus submit sleep -p '{"seconds": 2}' --wait`."""
    fields = {"priority": priority, "requirements": _json_arg(requirements, "--requirements") or {}}
    if idempotency_key:
        fields["idempotency_key"] = idempotency_key
    nexus = client()
    try:
        job = nexus.submit(job_type, _json_arg(payload, "--payload"), **fields)
        status_console.print(f"submitted [bold]{job['id']}[/bold] ({job['type']}, queue {job['queue']})")
        if wait:
            job = wait_with_progress(nexus, job["id"], timeout)
    except NexusError as exc:
        _fail(exc)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    emit_json(job) if as_json else console.print_json(data=job)
    if job["state"] in ("failed", "cancelled"):
        sys.exit(1)


def wait_with_progress(nexus: NexusClient, job_id: str, timeout: float) -> dict:
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=status_console, transient=True) as progress:
        task = progress.add_task("queued", total=None)

        def update(job: dict) -> None:
            done = job.get("progress") or {}
            progress.update(task, description=f"{job['state']} (attempt {job['attempt']})",
                            completed=done.get("done", 0), total=done.get("total"))

        return nexus.wait(job_id, timeout=timeout, on_update=update)


@click.command("jobs")
@click.option("--state", type=click.Choice([s.value for s in JobState]), default=None)
@click.option("--type", "job_type", default=None)
@click.option("-n", "--limit", default=20, show_default=True)
@json_option
def jobs_cmd(state, job_type, limit, as_json):
    """List recent jobs, newest first."""
    jobs = []
    try:
        for job in client().list(state=state, type=job_type):
            if len(jobs) >= limit:
                break
            jobs.append(job)
    except NexusError as exc:
        _fail(exc)
    if as_json:
        emit_json({"jobs": jobs})
        return
    table = Table("id", "type", "state", "attempt", "node", "created", "error")
    for job in jobs:
        table.add_row(job["id"], job["type"], job["state"], f"{job['attempt']}/{job['max_attempts']}",
                      job["node"] or "", job["created_at"][:19], (job["error"] or "")[:40])
    console.print(table)


@click.command("job")
@click.argument("job_id")
@click.option("--events", is_flag=True, help="Show the job's event log too.")
@json_option
def job_cmd(job_id, events, as_json):
    """Show one job."""
    try:
        nexus = client()
        job = nexus.get(job_id)
        if as_json:
            emit_json({**job, "events": nexus.events(job_id)} if events else job)
            return
        console.print_json(data=job)
        if events:
            table = Table("at", "from", "to", "attempt", "node", "cause", "message")
            for e in nexus.events(job_id):
                table.add_row(e["at"][:23], e["from_state"] or "", e["to_state"], str(e["attempt"]), e["node"] or "",
                              e.get("failure_kind") or "", e["message"] or "")
            console.print(table)
    except NexusError as exc:
        _fail(exc)


@click.command("token")
@click.argument("name", required=False)
@click.option("--role", type=click.Choice(["admin", "submitter", "worker"]), default="submitter", show_default=True)
@click.option("--tenant", default="default", show_default=True)
@click.option("--expires-in", type=click.IntRange(min=1), default=None, help="Seconds until the token stops working.")
@click.option("--rotate-join", is_flag=True, help="Instead: a new join token; the old one stops admitting nodes.")
def token_cmd(name, role, tenant, expires_in, rotate_join):
    """Create an API token (admin), or rotate the join token; the token is printed once."""
    if not rotate_join and not name:
        raise click.UsageError("give a NAME for the new token, or --rotate-join")
    try:
        nexus = client()
        console.print_json(data=nexus.rotate_join_token() if rotate_join
                           else nexus.create_token(name, role, tenant, expires_in_seconds=expires_in))
    except NexusError as exc:
        _fail(exc)
