"""Reads over the jobs table that describe proofs: segment states, verdicts, proven weight.

A proof is a `proof` job; its segments and its verifications are its children
(types `proof_segment` and `proof_verify`). Nothing here writes.

Proven weight: a node's count of valid nonces in a proof whose latest
verification accepted the receipt, summed over such proofs. The node API can
show it with `proven_weight_of(conn, node_name)` (nodes are named as in jobs.node).
"""

from __future__ import annotations

import uuid
from collections import Counter

from sqlalchemy import Connection, text

from nexus.proofs.jobs import PROOF_TYPE, SEGMENT_TYPE, VERIFY_TYPE

_SEGMENT_STATES = text("SELECT state, count(*) FROM jobs WHERE parent_id = :id AND type = :type GROUP BY state")

_VERDICTS = text(
    """SELECT id, state, payload->>'salt' AS salt, result->'verdict' AS verdict, error, created_at, finished_at
       FROM jobs WHERE parent_id = :id AND type = :type ORDER BY created_at, id"""
)

# The latest *finished* verification of each succeeded proof decides whether its counts are weight.
_ACCEPTED_COUNTS = """
    SELECT p.result->'node_counts' AS node_counts
    FROM jobs p
    WHERE p.type = :proof AND p.state = 'succeeded' {tenant_filter}
      AND (SELECT (v.result->'verdict'->>'accepted')::boolean FROM jobs v
           WHERE v.parent_id = p.id AND v.type = :verify AND v.state = 'succeeded'
           ORDER BY v.finished_at DESC, v.id DESC LIMIT 1) IS TRUE
"""


def segment_states(conn: Connection, proof_id: uuid.UUID) -> dict[str, int]:
    return {state: count for state, count in conn.execute(_SEGMENT_STATES, {"id": proof_id, "type": SEGMENT_TYPE})}


def verdicts(conn: Connection, proof_id: uuid.UUID) -> list[dict]:
    """Every verification of the proof, oldest first."""
    return [dict(r) for r in conn.execute(_VERDICTS, {"id": proof_id, "type": VERIFY_TYPE}).mappings()]


def latest_verdict(rows: list[dict]) -> dict | None:
    """The verdict of the most recently finished verification, if any finished."""
    finished = [r for r in rows if r["state"] == "succeeded" and r["verdict"] is not None]
    return max(finished, key=lambda r: r["finished_at"])["verdict"] if finished else None


def proven_weights(conn: Connection, tenant: str | None = None) -> dict[str, int]:
    """Node name -> accepted valid nonces over all verified proofs (of one tenant, or all)."""
    sql = _ACCEPTED_COUNTS.format(tenant_filter="AND p.tenant = :tenant" if tenant else "")
    params = {"proof": PROOF_TYPE, "verify": VERIFY_TYPE, "tenant": tenant}
    totals: Counter[str] = Counter()
    for (counts,) in conn.execute(text(sql), params):
        totals.update({node: int(n) for node, n in (counts or {}).items()})
    return dict(sorted(totals.items()))


def proven_weight_of(conn: Connection, node: str) -> int:
    """One node's proven weight, for the node API (read-only)."""
    return proven_weights(conn).get(node, 0)
