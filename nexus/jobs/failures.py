"""Where a retried job may run: the rule, as pure functions (placement.py applies it at claim time).

Failure streaks per node are counted in the database (a trigger on job_events,
migration 0002) and turned into quarantine by the reconciler (liveness.py).
"""

from __future__ import annotations

from typing import Collection, Iterable


def nodes_for_retry(eligible_nodes: Iterable[str], failed_on: Collection[str]) -> list[str]:
    """The eligible nodes a retried job may run on: those where it has not failed yet,
    or all eligible nodes when it has failed on every one of them (better a repeat than no run)."""
    eligible = list(eligible_nodes)
    fresh = [node for node in eligible if node not in failed_on]
    return fresh or eligible


def may_claim(node: str, failed_on: Collection[str], eligible_nodes: Iterable[str]) -> bool:
    """Whether `node` may claim a job that already failed on `failed_on`, given the other nodes
    that could take it now."""
    return node in nodes_for_retry(set(eligible_nodes) | {node}, failed_on)
