"""The /v1 catalog cache reads each model's entry once at a time, however many requests want it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from nexus.api.openai import _CatalogCache


class SlowCatalog:
    """A catalog read that takes a while, counting its calls: what a crowd would send to the pool."""

    def __init__(self) -> None:
        self.reads = 0
        self._lock = threading.Lock()

    def read(self, name: str) -> str:
        with self._lock:
            self.reads += 1
            version = self.reads
        time.sleep(0.2)
        return f"{name} v{version}"


def _crowd(cache: _CatalogCache, catalog: SlowCatalog, ttl: float, size: int = 20) -> list[str]:
    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(lambda _: cache.get("tiny", ttl, catalog.read), range(size)))


def test_a_crowd_with_nothing_cached_waits_for_one_read():
    cache, catalog = _CatalogCache(), SlowCatalog()
    assert _crowd(cache, catalog, ttl=60) == ["tiny v1"] * 20
    assert catalog.reads == 1


def test_when_the_entry_expires_one_request_refreshes_it_and_the_others_answer_from_the_old_one():
    cache, catalog = _CatalogCache(), SlowCatalog()
    assert cache.get("tiny", 0.05, catalog.read) == "tiny v1"
    time.sleep(0.1)  # expired
    answers = _crowd(cache, catalog, ttl=0.05)
    assert catalog.reads == 2  # one refresh, not one read per request
    assert set(answers) <= {"tiny v1", "tiny v2"} and "tiny v2" in answers
    assert cache.get("tiny", 60, catalog.read) == "tiny v2"


def test_no_cache_reads_every_time():
    cache, catalog = _CatalogCache(), SlowCatalog()
    cache.get("tiny", 0, catalog.read)
    cache.get("tiny", 0, catalog.read)
    assert catalog.reads == 2
