"""Retention: finished work is deleted a while after it finished, in small batches, by the reconciler.

A pass deletes finished *root* jobs older than their period (`completion` jobs, one per
/v1 request, after NEXUS_RETENTION_COMPLETION_SECONDS; every other type after
NEXUS_RETENTION_SECONDS; 0 keeps them), and with each root its whole tree: children
and their events go by the foreign keys' ON DELETE CASCADE, so a child is never deleted
while its parent lives, and a root with a child still active waits for a later pass.
Their objects go first (outputs, receipts unless NEXUS_RETENTION_KEEP_RECEIPTS, inputs
no remaining job refers to), then the rows in the same transaction: if the object store
fails, the rows stay and the next pass tries again, so no object is left without a row
that names it. Removed nodes and stopped model instances older than NEXUS_RETENTION_SECONDS
go too. Each query reads a partial index (migration 0006): a pass with nothing to delete
costs a few index probes and no object-store request. Finished jobs stay counted in
`job_counters` after they are deleted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text

from nexus.config import Settings
from nexus.storage import ObjectStore

log = logging.getLogger(__name__)

_FINAL = "state IN ('succeeded', 'failed', 'cancelled')"

# The two statements repeat the predicates of the two partial indexes exactly, so each reads its own.
_DUE_ROOTS = {
    "completion": text(f"""SELECT id FROM jobs WHERE parent_id IS NULL AND type = 'completion' AND {_FINAL}
                           AND finished_at < now() - make_interval(secs => :age)
                           ORDER BY finished_at LIMIT :batch FOR UPDATE SKIP LOCKED"""),
    "other": text(f"""SELECT id FROM jobs WHERE parent_id IS NULL AND type <> 'completion' AND {_FINAL}
                      AND finished_at < now() - make_interval(secs => :age)
                      ORDER BY finished_at LIMIT :batch FOR UPDATE SKIP LOCKED"""),
}

_TREES = text(
    """
    WITH RECURSIVE tree(root, id) AS (
        SELECT id, id FROM jobs WHERE id = ANY(:roots)
        UNION ALL
        SELECT tree.root, j.id FROM jobs j JOIN tree ON j.parent_id = tree.id
    )
    SELECT tree.root, j.id, j.state, j.input_key, j.output_key,
           j.result->>'receipt_key' AS receipt_key, j.result->>'result_key' AS result_key
    FROM tree JOIN jobs j ON j.id = tree.id
    """
)

_INPUTS_STILL_USED = text(
    "SELECT DISTINCT input_key FROM jobs WHERE input_key = ANY(:keys) AND NOT (id = ANY(:doomed))")

_DELETE_ROOTS = text("DELETE FROM jobs WHERE id = ANY(:roots)")  # children and events: ON DELETE CASCADE

_DELETE_OLD = {
    "nodes_deleted": text("""DELETE FROM nodes WHERE id IN (
        SELECT id FROM nodes WHERE state = 'removed' AND state_changed_at < now() - make_interval(secs => :age)
        ORDER BY state_changed_at LIMIT :batch FOR UPDATE SKIP LOCKED)"""),
    "instances_deleted": text("""DELETE FROM model_instances WHERE id IN (
        SELECT id FROM model_instances WHERE state = 'stopped' AND updated_at < now() - make_interval(secs => :age)
        ORDER BY updated_at LIMIT :batch FOR UPDATE SKIP LOCKED)"""),
}


@dataclass
class Doomed:
    """What one batch deletes: root ids, every job id of their trees, and the objects by bucket."""

    roots: list = field(default_factory=list)
    jobs: list = field(default_factory=list)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    receipts: set[str] = field(default_factory=set)


def retention_pass(engine: Engine, settings: Settings, store: ObjectStore | None = None) -> dict[str, int]:
    """One bounded pass: at most `retention_batch` root jobs of each class, nodes and instances."""
    counts = {"jobs_deleted": 0, "objects_deleted": 0}
    for kind, age in (("completion", settings.retention_completion_seconds), ("other", settings.retention_seconds)):
        if age > 0:
            jobs, objects = _delete_jobs(engine, settings, store, kind, age)
            counts["jobs_deleted"] += jobs
            counts["objects_deleted"] += objects
    for name, statement in _DELETE_OLD.items():
        counts[name] = 0
        if settings.retention_seconds > 0:
            with engine.begin() as conn:
                counts[name] = conn.execute(statement, {"age": settings.retention_seconds,
                                                        "batch": settings.retention_batch}).rowcount
    return counts


def _delete_jobs(engine: Engine, settings: Settings, store: ObjectStore | None, kind: str,
                 age: float) -> tuple[int, int]:
    with engine.begin() as conn:
        roots = [r[0] for r in conn.execute(_DUE_ROOTS[kind], {"age": age, "batch": settings.retention_batch})]
        if not roots:
            return 0, 0
        doomed = _collect(conn, roots, keep_receipts=settings.retention_keep_receipts)
        if not doomed.roots:
            return 0, 0
        if store is None:  # made only when there is something to delete: an idle pass opens no connection
            from nexus.storage import make_object_store
            store = make_object_store(settings)
        objects = (store.remove_many(settings.bucket_outputs, sorted(doomed.outputs))
                   + store.remove_many(settings.bucket_receipts, sorted(doomed.receipts))
                   + store.remove_many(settings.bucket_inputs, sorted(doomed.inputs)))
        conn.execute(_DELETE_ROOTS, {"roots": doomed.roots})
    log.info("retention: deleted %d %s job trees (%d jobs, %d objects)", len(doomed.roots), kind,
             len(doomed.jobs), objects)
    return len(doomed.jobs), objects


def _collect(conn: Connection, roots: list, keep_receipts: bool) -> Doomed:
    """The trees of these roots, less those with a job still active (they wait for a later pass)."""
    trees: dict = defaultdict(list)
    for row in conn.execute(_TREES, {"roots": roots}):
        trees[row.root].append(row)
    doomed = Doomed()
    for root, rows in trees.items():
        if any(r.state not in ("succeeded", "failed", "cancelled") for r in rows):
            continue
        doomed.roots.append(root)
        for r in rows:
            doomed.jobs.append(r.id)
            doomed.outputs.update(k for k in (r.output_key,) if k)
            if not keep_receipts:
                doomed.receipts.update(k for k in (r.receipt_key, r.result_key) if k)
            doomed.inputs.update(k for k in (r.input_key,) if k)
    if doomed.inputs:  # an input another job still refers to stays
        used = conn.execute(_INPUTS_STILL_USED, {"keys": sorted(doomed.inputs), "doomed": doomed.jobs})
        doomed.inputs -= {r[0] for r in used}
    return doomed
