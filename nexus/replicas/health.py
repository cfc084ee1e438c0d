"""Skip a replica for a while after it fails, so a dead one costs one timeout, not one per read."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Cooldown:
    """`available()` is False for `seconds` after `failed()`; `clock` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self._until = 0.0
        self._lock = threading.Lock()

    def available(self) -> bool:
        with self._lock:
            return self.clock() >= self._until

    def failed(self) -> None:
        with self._lock:
            self._until = self.clock() + self.seconds
