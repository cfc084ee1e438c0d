"""`nexus bench run MODEL …` runs a throughput sweep with a progress bar and prints its table;
`nexus bench show ID` prints one again, `--plot out.png` saves its picture."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nexus.cli.jobs import _fail, client, console
from nexus.client import NexusClient, NexusError


def _int_list(_ctx, _param, value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, e.g. 1,4,16; got {value!r}") from None


@click.group("bench")
def bench_cmd():
    """Throughput sweeps of a catalog model on the cluster's nodes."""


@bench_cmd.command("run")
@click.argument("model")
@click.option("-b", "--batch-sizes", default="1,4,16", show_default=True, callback=_int_list,
              help="Requests in flight at once, comma-separated.")
@click.option("-c", "--context-lengths", default="128,1024", show_default=True, callback=_int_list,
              help="Prompt tokens, comma-separated.")
@click.option("-n", "--node", "nodes", multiple=True, help="A node name or id (repeat; default: every ready node).")
@click.option("--output-tokens", type=int, default=32, show_default=True, help="Tokens each request generates.")
@click.option("--repetitions", type=int, default=1, show_default=True, help="Times each cell runs.")
@click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the plot (PNG) here when it finishes.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
def run_cmd(model, batch_sizes, context_lengths, nodes, output_tokens, repetitions, priority, plot_path, timeout):
    """Measure MODEL, e.g. `nexus bench run tiny -b 1,4 -c 32,128 --plot bench.png`."""
    nexus = client()
    try:
        benchmark = nexus.benchmark(model, batch_sizes=batch_sizes, context_lengths=context_lengths,
                                    nodes=list(nodes), output_tokens=output_tokens, repetitions=repetitions,
                                    priority=priority)
        console.print(f"benchmark [bold]{benchmark['id']}[/bold]: {model} on {', '.join(benchmark['nodes'])}")
        benchmark = _wait(nexus, benchmark["id"], timeout)
    except NexusError as exc:
        _fail(exc)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    _finish(nexus, benchmark, plot_path)


@bench_cmd.command("show")
@click.argument("benchmark_id")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the plot (PNG) here.")
def show_cmd(benchmark_id, plot_path):
    """Print a benchmark's cells; `--plot out.png` saves its plot."""
    nexus = client()
    try:
        benchmark = nexus.get_benchmark(benchmark_id)
    except NexusError as exc:
        _fail(exc)
    _finish(nexus, benchmark, plot_path)


@bench_cmd.command("list")
def list_cmd():
    """Recent benchmarks."""
    table = Table("id", "model", "state", "nodes", "cells", "created")
    try:
        for benchmark in client().request("GET", "/api/v1/benchmarks")["benchmarks"]:
            progress = benchmark.get("progress") or {}
            table.add_row(benchmark["id"], benchmark["model"], benchmark["state"], ", ".join(benchmark["nodes"]),
                          f"{progress.get('done', 0)}/{progress.get('total', '?')}", benchmark["created_at"][:19])
    except NexusError as exc:
        _fail(exc)
    console.print(table)


def _wait(nexus: NexusClient, benchmark_id: str, timeout: float) -> dict:
    """Follow the benchmark's job with a bar of cells (plain lines when not on a terminal)."""
    last = [None]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} cells"),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("queued", total=None)

        def update(job: dict) -> None:
            done = job.get("progress") or {}
            progress.update(task, description=job["state"], completed=done.get("done", 0), total=done.get("total"))
            line = (job["state"], done.get("done", 0), done.get("total"))
            if not console.is_terminal and line != last[0]:
                console.print(f"{line[0]}: {line[1]}/{line[2] if line[2] is not None else '?'} cells")
                last[0] = line

        nexus.wait(benchmark_id, timeout=timeout, on_update=update)
    return nexus.get_benchmark(benchmark_id)


def _finish(nexus: NexusClient, benchmark: dict, plot_path: Path | None) -> None:
    console.print(cell_table(benchmark["cells"]))
    for node, instance in sorted((benchmark.get("instances") or {}).items()):
        console.print(f"{node}: measured {'its running instance' if instance == 'serving' else 'a temporary instance'}")
    if benchmark.get("error"):
        console.print(f"[red]{benchmark['state']}[/red]: {benchmark['error']}")
    if plot_path is not None and benchmark["cells"]:
        try:
            plot_path.write_bytes(nexus.benchmark_plot(benchmark["id"]))
        except NexusError as exc:
            _fail(exc)
        console.print(f"plot saved to {plot_path}")
    if benchmark["state"] != "succeeded":
        sys.exit(1)


def cell_table(cells: list[dict]) -> Table:
    table = Table("node", "batch", "context", "out tok/s", "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)",
                  "peak mem (MB)", "errors")
    for cell in cells:
        memory = "-" if cell["peak_memory_mb"] is None else f"{cell['peak_memory_mb']:.0f} {cell['memory_kind']}"
        table.add_row(cell["node"], str(cell["batch_size"]), str(cell["context_length"]),
                      f"{cell['output_tok_s']:.1f}", _ms(cell["ttft_p50_ms"]), _ms(cell["ttft_p99_ms"]),
                      _ms(cell["itl_p50_ms"]), memory, str(cell["errors"]))
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
