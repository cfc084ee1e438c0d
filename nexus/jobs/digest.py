"""`digest`: a diagnostic job that reads through the node's replicas and says where each read came from.

Submit it with an uploaded input to check a worker's replicas end to end:

    nexus submit digest --input model.bin --wait
    # {"sha256": "…", "size": 6815744, "spec_source": "replica", "object_source": "local", …}

It reads its own job row (committed before the message's LSN, so a caught-up
standby must have it) and its input object, and returns their digest.
"""

from __future__ import annotations

import hashlib
from typing import Any

from nexus.db.functions import DefinerFunction
from nexus.jobs.context import JobContext
from nexus.jobs.registry import JobType
from nexus.jobs.states import ACTIVE_STATES, sql_in
from nexus.replicas.health import Cooldown
from nexus.replicas.node import NodeReads, object_with_source
from nexus.replicas.standby import StandbyReads
from nexus.replicas.stats import ReadStats

# A function, so the worker role may call it on the master and on its standby alike (a read-only call);
# only a job still waiting or running answers.
JOB_SPEC = DefinerFunction(
    "nexus_w_job_spec", {"id": "uuid"},
    {"type": "jobs.type%TYPE", "input_key": "jobs.input_key%TYPE", "payload": "jobs.payload%TYPE"},
    f"SELECT j.type, j.input_key, j.payload FROM jobs j WHERE j.id = :id AND {sql_in('j.state', ACTIVE_STATES)}")
_SPEC_SQL = "SELECT type, input_key, payload FROM nexus_w_job_spec(:id)"


def validate_digest(payload: Any) -> dict[str, Any]:
    if payload is None:
        return {}
    if not isinstance(payload, dict) or set(payload) - {"etag"}:
        raise ValueError("payload must be an object with at most an `etag` (the input's expected ETag)")
    if "etag" in payload and not isinstance(payload["etag"], str):
        raise ValueError("etag must be a string")
    return payload


def node_reads(ctx: JobContext) -> NodeReads:
    """The runner's NodeReads, or master-only reads for a context built without them."""
    if ctx.reads is not None:
        return ctx.reads
    stats = ReadStats()
    return NodeReads(StandbyReads(ctx.engine, None, 0.0, Cooldown(1.0), stats), ctx.storage, None, stats)


def run_digest(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    reads = node_reads(ctx)
    rows, spec_source = reads.rows(_SPEC_SQL, {"id": ctx.job_id}, after_lsn=ctx.read_after_lsn)
    if not rows or not rows[0]["input_key"]:
        raise ValueError("digest needs an input object (submit it with input_key)")
    # Through the job's own store: on a worker, the master grants this lease its input (nexus.storage.leased).
    data, object_source = object_with_source(ctx.storage, ctx.settings.bucket_inputs, rows[0]["input_key"],
                                             payload.get("etag"))
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "node": ctx.node,
            "spec_source": spec_source, "object_source": object_source}


digest = JobType(name="digest", run=run_digest, validate=validate_digest, reads_standby=True)
