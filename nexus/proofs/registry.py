"""Proof kinds by name: the built-ins plus those other packages register under
the entry-point group `nexus.proof_kinds`.

An entry point may name a ProofKind instance or a zero-argument class/factory
that returns one. A plug-in cannot shadow a built-in: the built-in wins and the
clash is logged, so installing a package never silently changes what `poc` means.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points

from nexus.proofs.base import ProofKind
from nexus.proofs.poc import PocKind

ENTRY_POINT_GROUP = "nexus.proof_kinds"

log = logging.getLogger(__name__)


def builtin_kinds() -> dict[str, ProofKind]:
    return {PocKind.name: PocKind()}


@functools.lru_cache(maxsize=1)
def available_kinds() -> dict[str, ProofKind]:
    kinds = builtin_kinds()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in kinds:
            log.warning("proof kind %r from %s ignored: the name is taken", entry.name, entry.value)
            continue
        try:
            kinds[entry.name] = _instantiate(entry.load(), entry.name)
        except Exception:  # a broken plug-in must not take the built-in kinds down with it
            log.exception("proof kind %r from %s failed to load", entry.name, entry.value)
    return kinds


def _instantiate(loaded: object, name: str) -> ProofKind:
    # A class passes the Protocol's attribute check too, so test for it first.
    if isinstance(loaded, type) or (callable(loaded) and not isinstance(loaded, ProofKind)):
        kind = loaded()
    else:
        kind = loaded
    if not isinstance(kind, ProofKind):
        raise TypeError(f"entry point {name!r} is not a proof kind (needs name, resolve, split, prove, join, verify)")
    if kind.name != name:
        raise TypeError(f"entry point {name!r} names a kind called {kind.name!r}")
    return kind


def get_kind(name: str) -> ProofKind:
    kinds = available_kinds()
    if name not in kinds:
        raise ValueError(f"unknown proof kind {name!r}; expected one of {sorted(kinds)}")
    return kinds[name]
