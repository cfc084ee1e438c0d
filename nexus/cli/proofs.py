"""`nexus verify receipt.json` (offline, no cluster) and `nexus prove` (on the cluster, or --local)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@click.command("verify")
@click.argument("receipt", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--salt", default="", help="Changes which nonces are sampled (pass a fresh one to distrust the prover).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole verdict as JSON.")
def verify_cmd(receipt: Path, salt: str, as_json: bool) -> None:
    """Verify a proof receipt on this machine: digests, Merkle root, and a recomputed sample.

    Exits 0 when the receipt is accepted, 1 when it is rejected. Needs no cluster."""
    from nexus.proofs.verify import verify_receipt_file

    verdict = verify_receipt_file(receipt, salt=salt)
    if as_json:
        click.echo(json.dumps(verdict.to_dict(), indent=2))
    else:
        _print_verdict(verdict)
    sys.exit(0 if verdict.accepted else 1)


def _print_verdict(verdict) -> None:
    word = "[green]ACCEPTED[/green]" if verdict.accepted else "[red]REJECTED[/red]"
    console.print(f"{word}  kind {verdict.kind or '?'}  receipt {verdict.receipt_digest[:16] or '?'}")
    if verdict.sampled:
        console.print(f"  recomputed {verdict.sampled} sampled nonces: {verdict.failures} did not reproduce "
                      f"(binomial p = {verdict.p_value:.3g})")
    for reason in verdict.reasons:
        console.print(f"  - {reason}")


@click.command("prove")
@click.option("--nonces", required=True, metavar="START:END", help="Nonce range, end exclusive, e.g. 0:4096.")
@click.option("--preset", default="tiny", show_default=True, help="poc preset (tiny, standard).")
@click.option("--kind", default="poc", show_default=True)
@click.option("--seed", default=None, help="Seed string (drawn when absent).")
@click.option("--segment-size", type=int, default=None, help="Nonces per segment (the preset's default when absent).")
@click.option("--allow-cpu", is_flag=True, help="Let CPU workers prove segments.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("receipt.json"),
              show_default=True, help="Where to write the receipt.")
@click.option("--local", "local_node", default=None, metavar="NODE",
              help="Prove in this process as node NODE, with no cluster.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait for the cluster.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the receipt's summary as one JSON document on stdout (progress stays on stderr).")
def prove_cmd(nonces, preset, kind, seed, segment_size, allow_cpu, output, local_node, timeout, as_json) -> None:
    """Run a proof and write its receipt, e.g. `nexus prove --nonces 0:4096 --allow-cpu`.

    Shows segments proven / total as a progress bar on stderr."""
    start, end = _nonce_range(nonces)
    request = {"kind": kind, "nonce_start": start, "nonce_end": end, "allow_cpu": allow_cpu,
               "options": {"preset": preset}}
    if seed is not None:
        request["seed"] = seed
    if segment_size is not None:
        request["segment_size"] = segment_size
    receipt = _prove_locally(request, local_node) if local_node else _prove_on_cluster(request, timeout)
    output.write_text(json.dumps(receipt, indent=1))
    console.print(f"receipt written to {output}: {receipt['valid_count']} valid nonces, "
                  f"Merkle root {receipt['merkle_root'][:16]}…, by node {receipt['node_counts']}")
    if as_json:
        click.echo(json.dumps({"receipt": str(output), "valid_count": receipt["valid_count"],
                               "merkle_root": receipt["merkle_root"], "node_counts": receipt["node_counts"]}))


def _nonce_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter("expected START:END, e.g. 0:4096", param_hint="--nonces") from None
    return start, end


def _prove_locally(request: dict, node: str) -> dict:
    from nexus.proofs.local import prove_locally
    from nexus.proofs.requests import parse_proof_request

    try:
        parsed = parse_proof_request(request)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    with segment_progress() as progress:
        task = progress.add_task("proving", total=None)

        def on_segment(result, total: int) -> None:
            progress.update(task, advance=1, total=total,
                            description=f"segment {result.segment.index + 1}: {len(result.valid)} valid, "
                                        f"{result.nonces_per_second:,.0f} nonces/s")

        return prove_locally(parsed, node, on_segment=on_segment)


def _prove_on_cluster(request: dict, timeout: float) -> dict:
    from nexus.cli.jobs import client
    from nexus.client import NexusError

    nexus = client()
    try:
        proof = nexus.request("POST", "/api/v1/proofs", json=request)
        console.print(f"proof [bold]{proof['id']}[/bold] submitted")
        with segment_progress() as progress:
            task = progress.add_task("queued", total=None)

            def on_update(job: dict) -> None:
                done = job.get("progress") or {}
                progress.update(task, description=job["state"], completed=done.get("done", 0), total=done.get("total"))

            job = nexus.wait(proof["id"], timeout=timeout, on_update=on_update)
        if job["state"] != "succeeded":
            raise click.ClickException(f"proof {job['state']}: {job.get('error') or ''}")
        proof = nexus.request("GET", f"/api/v1/proofs/{proof['id']}")
    except NexusError as exc:
        raise click.ClickException(f"{exc.message} {json.dumps(exc.details) if exc.details else ''}") from None
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    if proof["receipt"] is None:
        import requests

        return requests.get(proof["receipt_url"], timeout=60).json()
    return proof["receipt"]


def segment_progress() -> Progress:
    """Segments proven / total, on stderr: redrawn on a terminal, else its last state once at the end."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("segments"),
                    TimeElapsedColumn(), console=console)
