"""The `nexus` command. Flags are bound to the same NEXUS_* names Settings reads.

Commands load with their module when they run: a server process (`nexus reconciler`, `flower`,
`master`) must not hold the client's requests and rich tables for its whole life, and a client
command need not import the servers' code.
"""

from __future__ import annotations

import importlib
import logging

import click

import nexus

# command name -> the module of nexus.cli that defines it, and the command's name there
COMMANDS = {
    "dev": ("services", "dev_cmd"), "master": ("services", "master_cmd"), "worker": ("services", "worker_cmd"),
    "verifier": ("services", "verifier_cmd"), "reconciler": ("services", "reconciler_cmd"),
    "flower": ("services", "flower_cmd"),
    "submit": ("jobs", "submit_cmd"), "jobs": ("jobs", "jobs_cmd"), "job": ("jobs", "job_cmd"),
    "token": ("jobs", "token_cmd"),
    "config": ("config", "config_cmd"),  # `just config`: writes bento.env / worker.env
    "prove": ("proofs", "prove_cmd"), "verify": ("proofs", "verify_cmd"),  # `nexus verify` needs no cluster
    "models": ("models", "models_cmd"), "chat": ("models", "chat_cmd"),  # the model catalog, a chat
    "agent": ("nodes", "agent_cmd"), "status": ("nodes", "status_cmd"), "nodes": ("nodes", "nodes_cmd"),
    "node": ("nodes", "node_cmd"),
    "bench": ("bench", "bench_cmd"),  # throughput sweeps per node
}


class _NexusGroup(click.Group):
    """Commands imported on first use (COMMANDS). Settings that are refused (production with default
    secrets, a bad value) end the command with the reason on one line and exit status 1, not a traceback."""

    def list_commands(self, ctx):
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return self.commands.get(cmd_name)
        module, attr = COMMANDS[cmd_name]
        return getattr(importlib.import_module(f"nexus.cli.{module}"), attr)

    def invoke(self, ctx):
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except ValidationError as error:
            if error.title != "Settings":
                raise
            reasons = "; ".join(_reason(e) for e in error.errors())
            raise click.ClickException(f"refusing to start: {reasons}") from None


def _reason(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    return f"NEXUS_{str(error['loc'][0]).upper()}: {message}" if error.get("loc") else message


@click.group(cls=_NexusGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(nexus.__version__, package_name="nexus-cluster")
def main(verbose: bool) -> None:
    """Nexus: one compute cluster out of a rack of mixed GPU machines."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
