"""`nexus models ...` (make-tiny, add, list, deploy, stop) and `nexus chat`, an interactive client."""

from __future__ import annotations

import json
from pathlib import Path

import click
import requests
from rich.console import Console
from rich.table import Column, Table

from nexus.cli.jobs import _fail, client, emit_json, json_option
from nexus.client import NexusClient, NexusError

console = Console()


@click.group("models")
def models_cmd() -> None:
    """The model catalog and its instances."""


@models_cmd.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def make_tiny_cmd(directory: Path, seed: int) -> None:
    """Write a tiny Llama model (random weights, locally trained tokenizer) in the Hugging Face layout."""
    from nexus.serving.tiny import TinyModelSpec, make_tiny_model

    path = make_tiny_model(directory, TinyModelSpec(seed=seed))
    console.print(f"tiny model written to [bold]{path}[/bold]: {', '.join(sorted(p.name for p in path.iterdir()))}")


@models_cmd.command("add")
@click.argument("name")
@click.argument("source")
@click.option("--backend", type=click.Choice(["transformers", "vllm", "openai"]), default="transformers",
              show_default=True)
@click.option("--vram-mb", type=int, default=0, show_default=True, help="VRAM the model needs in all.")
@click.option("--min-tier", default="cpu_only", show_default=True)
@click.option("--max-model-len", type=int, default=None)
@click.option("--args", "args_json", default=None, help='Backend options as JSON, e.g. \'{"url": "http://h:8000/v1"}\'.')
def add_cmd(name, source, backend, vram_mb, min_tier, max_model_len, args_json) -> None:
    """Declare a model: SOURCE is a path on the workers or s3://bucket/prefix."""
    body = {"name": name, "source": source, "backend": backend, "vram_mb": vram_mb, "min_tier": min_tier,
            "max_model_len": max_model_len, "args": json.loads(args_json) if args_json else {}}
    try:
        console.print_json(data=client().request("POST", "/api/v1/models", json=body))
    except NexusError as exc:
        _fail(exc)


@models_cmd.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """Models, their backends and how many instances serve each."""
    try:
        if as_json:
            emit_json(client().request("GET", "/api/v1/models"))
        else:
            _models_table(client())
    except NexusError as exc:
        _fail(exc)


@models_cmd.command("deploy")
@click.argument("name")
@click.option("--tp", "tensor_parallel_size", type=click.Choice(["1", "2", "4", "8"]), default=None)
@click.option("--pp", "pipeline_parallel_size", type=click.IntRange(1, 8), default=None)
@click.option("--node", "nodes", multiple=True, metavar="NODE",
              help="Place it only on this node: name, id or id prefix (repeatable). A CPU model is placed "
                   "on a node only when one is named.")
@click.option("--wait", "wait_seconds", type=float, default=None, metavar="SECONDS",
              help="Follow the instance (pending, downloading its weights, starting) until it runs or fails, "
                   "at most SECONDS, with progress on stderr; then print it.")
def deploy_cmd(name, tensor_parallel_size, pipeline_parallel_size, nodes, wait_seconds) -> None:
    """Place an instance of the model (placement picks nodes, GPUs and a parallelism plan); prints it as JSON."""
    from nexus.cli.nodes import resolve_node

    nexus = client()
    body: dict = {k: v for k, v in {"tensor_parallel_size": int(tensor_parallel_size) if tensor_parallel_size else None,
                                    "pipeline_parallel_size": pipeline_parallel_size}.items() if v is not None}
    try:
        if nodes:
            body["nodes"] = [resolve_node(nexus, reference) for reference in nodes]
        instance = nexus.request("POST", f"/api/v1/models/{name}/instances", json=body)
        if wait_seconds is not None:
            instance = follow_instance(nexus, name, instance, wait_seconds)
        emit_json(instance)
    except NexusError as exc:
        _fail(exc)
    if wait_seconds is not None and instance["state"] != "running":
        raise click.ClickException(f"instance {instance['id']} is {instance['state']}"
                                   + (f": {instance['error']}" if instance.get("error") else ""))


# What an instance goes through before it serves, as steps of a progress bar.
INSTANCE_STEPS = ("pending", "downloading", "starting", "running")


def follow_instance(nexus: NexusClient, model: str, instance: dict, timeout: float) -> dict:
    """Poll the instance until it runs, fails or the time is up; its steps as a bar on stderr."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from nexus.cli.jobs import status_console

    deadline = time.monotonic() + timeout
    with Progress(TextColumn(f"{model} {{task.description}}"), BarColumn(), TimeElapsedColumn(),
                  console=status_console, transient=status_console.is_terminal) as progress:
        task = progress.add_task(instance["state"], total=len(INSTANCE_STEPS) - 1)
        while True:
            state = instance["state"]
            step = INSTANCE_STEPS.index(state) if state in INSTANCE_STEPS else 0
            progress.update(task, description=state, completed=step)
            if state not in INSTANCE_STEPS[:-1] or time.monotonic() > deadline:
                return instance
            time.sleep(0.5)
            found = [i for i in nexus.request("GET", f"/api/v1/models/{model}/instances")["instances"]
                     if i["id"] == instance["id"]]
            instance = found[0] if found else {**instance, "state": "stopped"}


@models_cmd.command("stop")
@click.argument("name")
@click.argument("instance_id")
def stop_cmd(name, instance_id) -> None:
    """Stop one instance."""
    try:
        console.print_json(data=client().request("DELETE", f"/api/v1/models/{name}/instances/{instance_id}"))
    except NexusError as exc:
        _fail(exc)


def _models_table(nexus: NexusClient) -> None:
    table = Table("model", Column("backend", no_wrap=True), Column("source", overflow="fold"), "vram MB",
                  "instances", "serving", "requests")
    for model in nexus.request("GET", "/api/v1/models")["models"]:
        states = ", ".join(f"{i['state']}" for i in model["instances"]) or "-"
        load = model["requests"]  # in flight / slots, and those waiting for one
        requests = f"{load['in_flight']}/{load['capacity']}" + (f" +{load['waiting']} waiting" if load["waiting"] else "")
        table.add_row(model["name"], model["backend"], model["source"], str(model["vram_mb"]), states,
                      str(model["live_instances"]), requests)
    console.print(table)


# --- chat ------------------------------------------------------------------------------

CHAT_HELP = "type a message; commands: status, nodes, models, reset, quit"


@click.command("chat")
@click.option("-m", "--model", default=None, help="Model to talk to (default: the first one serving).")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
def chat_cmd(model: str | None, max_tokens: int, temperature: float) -> None:
    """An interactive chat that streams answers; understands status, nodes, models, quit."""
    nexus = client()
    model = model or _first_serving_model(nexus)
    console.print(f"chatting with [bold]{model}[/bold] — {CHAT_HELP}")
    history: list[dict] = []
    while True:
        try:
            line = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line in ("quit", "exit", "/quit"):
            return
        if _command(nexus, line, history):
            continue
        history.append({"role": "user", "content": line})
        answer = _stream_answer(nexus, model, history, max_tokens, temperature)
        if answer is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": answer})


def _command(nexus: NexusClient, line: str, history: list[dict]) -> bool:
    try:
        if line == "status":
            _health_table(nexus.health())
        elif line == "models":
            _models_table(nexus)
        elif line == "nodes":
            _nodes_table(nexus)
        elif line == "reset":
            history.clear()
            console.print("conversation cleared")
        elif line == "help":
            console.print(CHAT_HELP)
        else:
            return False
    except NexusError as exc:
        console.print(f"[red]{exc.message}[/red]")
    return True


def _health_table(health: dict) -> None:
    """/healthz as a table: each dependency and the workers, whether they answer and how."""
    table = Table("part", "ok", "details", title=f"cluster {health.get('status', '?')}")
    parts = {**(health.get("dependencies") or {}), "workers": health.get("workers") or {}}
    for part, checks in parts.items():
        details = ", ".join(f"{k} {v}" for k, v in checks.items() if k != "ok")
        table.add_row(part, "yes" if checks.get("ok") else "no", details)
    console.print(table)


def _nodes_table(nexus: NexusClient) -> None:
    table = Table("node", "state", "tier", "GPUs", "models")
    for node in nexus.request("GET", "/api/v1/nodes").get("nodes", []):
        table.add_row(str(node.get("name")), str(node.get("state")), str(node.get("tier")),
                      str(node.get("gpu_count", 0)), ", ".join(node.get("loaded_models") or []))
    console.print(table)


def _first_serving_model(nexus: NexusClient) -> str:
    try:
        models = nexus.request("GET", "/api/v1/models")["models"]
    except NexusError as exc:
        raise click.ClickException(exc.message) from None
    serving = [m["name"] for m in models if m["live_instances"]]
    if not serving:
        raise click.ClickException("no model is serving; deploy one (`nexus models deploy NAME`) or pass --model")
    return serving[0]


def _stream_answer(nexus: NexusClient, model: str, history: list[dict], max_tokens: int,
                   temperature: float) -> str | None:
    """Print the answer as it streams; None when the request failed."""
    body = {"model": model, "messages": history, "stream": True, "max_tokens": max_tokens,
            "temperature": temperature}
    pieces: list[str] = []
    try:
        with nexus.session.post(nexus.url + "/v1/chat/completions", json=body, stream=True, timeout=(10, 600)) as r:
            if r.status_code >= 400:
                console.print(f"[red]{r.json().get('error', {}).get('message', r.text)}[/red]")
                return None
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    console.print(f"\n[red]{chunk['error'].get('message')}[/red]")
                    return None
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    pieces.append(text)
                    console.print(text, end="", markup=False, highlight=False)
    except requests.RequestException as exc:
        console.print(f"[red]request failed: {exc}[/red]")
        return None
    console.print()
    return "".join(pieces)
