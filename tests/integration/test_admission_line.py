"""Requests waiting for a model's serving slot, on a real Redis: they stand in line, only the first of
the line tries for a slot, they are admitted in arrival order, and how many wait is observable."""

from __future__ import annotations

import threading
import time
import uuid

from nexus.models import liveness
from nexus.models.admission import Admission
from tests.support import wait_for

WAITERS = 10


class CountingAdmission(Admission):
    """The real Admission, counting the slot scripts it runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tries = 0

    def try_acquire(self, model, request_id, hold_seconds):
        self.tries += 1
        return super().try_acquire(model, request_id, hold_seconds)


def test_waiters_stand_in_line_and_are_admitted_in_arrival_order(services):
    admission = CountingAdmission(services.redis, default_slots=1)
    model = f"line-{uuid.uuid4().hex[:8]}"
    liveness.announce(services.redis, model, "instance-1", ttl_seconds=120, slots=1)
    holder = admission.acquire(model, "holder", hold_seconds=60, wait_seconds=0)
    assert holder is not None
    admitted: list[int] = []

    def wait(i: int) -> None:
        slot = admission.acquire(model, f"waiter-{i}", hold_seconds=60, wait_seconds=30)
        assert slot is not None
        admitted.append(i)
        slot.release()  # the next in line gets it

    threads = []
    for i in range(WAITERS):
        threads.append(threading.Thread(target=wait, args=(i,), daemon=True))
        threads[-1].start()
        wait_for(lambda: admission.load(model).waiting == i + 1, timeout=5, what=f"waiter {i} in line")
    load = admission.load(model)
    assert (load.capacity, load.in_flight, load.waiting) == (1, 1, WAITERS)

    tries_before = admission.tries
    time.sleep(2)
    # The first of the line polls, backing off to 0.5 s: about 6 tries in 2 s. Each of ten waiters polling
    # for itself, as before, was about 70.
    assert admission.tries - tries_before <= 12, admission.tries - tries_before

    holder.release()
    for thread in threads:
        thread.join(10)
    assert admitted == list(range(WAITERS))
    load = admission.load(model)
    assert (load.in_flight, load.waiting) == (0, 0)


def test_a_waiter_that_gives_up_leaves_the_line_to_the_next(services):
    admission = Admission(services.redis, default_slots=1)
    model = f"line-{uuid.uuid4().hex[:8]}"
    liveness.announce(services.redis, model, "instance-1", ttl_seconds=120, slots=1)
    holder = admission.acquire(model, "holder", hold_seconds=60, wait_seconds=0)
    results: dict[str, object] = {}
    impatient = threading.Thread(target=lambda: results.update(
        impatient=admission.acquire(model, "impatient", hold_seconds=60, wait_seconds=0.5)))
    impatient.start()
    wait_for(lambda: admission.load(model).waiting == 1, timeout=5, what="the impatient one in line")
    patient = threading.Thread(target=lambda: results.update(
        patient=admission.acquire(model, "patient", hold_seconds=60, wait_seconds=20)))
    patient.start()
    impatient.join(5)
    assert results["impatient"] is None  # its wait lapsed
    assert admission.load(model).waiting == 1
    # A release elsewhere (another API process): found by the new first of the line, which polls.
    services.redis.zrem(f"nexus:inflight:{model}", holder.request_id)
    patient.join(5)
    assert results["patient"] is not None
    assert admission.load(model).waiting == 0
