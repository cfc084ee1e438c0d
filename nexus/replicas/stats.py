"""Counters of where reads were served from, for tests, benchmarks and logs."""

from __future__ import annotations

import threading
from collections import Counter


class ReadStats:
    """Thread-safe counts keyed `what:outcome`, e.g. `rows:replica`, `objects:master`, `flags:error`."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, what: str, outcome: str) -> None:
        with self._lock:
            self._counts[f"{what}:{outcome}"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
