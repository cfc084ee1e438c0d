"""The `nexus` command. Flags are bound to the same NEXUS_* names Settings reads."""

from __future__ import annotations

import logging

import click

import nexus
from pydantic import ValidationError

from nexus.cli.config import config_cmd
from nexus.cli.jobs import job_cmd, jobs_cmd, submit_cmd, token_cmd
from nexus.cli.models import chat_cmd, models_cmd
from nexus.cli.proofs import prove_cmd, verify_cmd
from nexus.cli.services import dev_cmd, flower_cmd, master_cmd, reconciler_cmd, verifier_cmd, worker_cmd


class _NexusGroup(click.Group):
    """Settings that are refused (production with default secrets, a bad value) end the command with the
    reason on one line and exit status 1, not a traceback."""

    def invoke(self, ctx):
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


for command in (dev_cmd, master_cmd, worker_cmd, verifier_cmd, reconciler_cmd, flower_cmd, submit_cmd, jobs_cmd, job_cmd,
                token_cmd):
    main.add_command(command)

main.add_command(config_cmd)  # `just config`: writes bento.env / worker.env

for command in (prove_cmd, verify_cmd):  # proofs: `nexus verify` needs no cluster
    main.add_command(command)

for command in (models_cmd, chat_cmd):  # inference: the model catalog and an interactive chat
    main.add_command(command)

from nexus.cli.nodes import agent_cmd, node_cmd, nodes_cmd, status_cmd  # noqa: E402  (the node agent)

for command in (agent_cmd, status_cmd, nodes_cmd, node_cmd):
    main.add_command(command)

from nexus.cli.bench import bench_cmd  # noqa: E402  (throughput sweeps per node)

main.add_command(bench_cmd)
