"""Turns for taking in /v1 requests: at most a few per API process at once do the work before their job
is written (routing, authentication, the gate's round trip, the insert, the publish); the others wait
their turn as sleeping greenlets, in arrival order.

Why: under gevent every request that has work to do is a runnable greenlet, and the process runs them
in turn. With 2,000 streams opened at once (`bench/inference.py --idle-streams 2000`) that was seconds
of queued CPU: a /healthz probe waited 5-10 s behind it, and a request that had its database
connection and its answer waited as long for the CPU to give it back, so the pool ran dry and some
requests failed after its 30 s timeout. With turns, what runs at once is bounded, and a request
holding a connection gets the CPU again within a few others' work.

A request gives its turn back as soon as it would wait on something else: a serving slot of its model
(every instance full) or its first token (`release_turn`, from the view), and in any case when the
app returns. Waiting for a turn is bounded by Settings.inference_admission_wait_seconds, then 429.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from nexus.api.refusals import too_many_requests
from nexus.inference.openai_shapes import ModelBusyError

TURN_KEY = "nexus.intake_turn"  # in the WSGI environ: gives the request's turn back (idempotent)
TAKEN_IN = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})


class IntakeTurns:
    """WSGI middleware: a turn per POST to the /v1 request routes, `turns` at once."""

    def __init__(self, app: Callable[..., Iterable[bytes]], turns: int, wait_seconds: float) -> None:
        self.app = app
        self.turns, self.wait_seconds = turns, wait_seconds
        self._semaphore: threading.BoundedSemaphore | None = None  # made in the serving process, after
        # gevent patched threading: a wait for a turn is then a sleeping greenlet

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") not in TAKEN_IN:
            return self.app(environ, start_response)
        if self._semaphore is None:
            self._semaphore = threading.BoundedSemaphore(self.turns)
        semaphore = self._semaphore
        if not semaphore.acquire(timeout=self.wait_seconds):
            return _busy(start_response, self.wait_seconds)
        held = [True]

        def give_back() -> None:
            if held[0]:
                held[0] = False
                semaphore.release()

        environ[TURN_KEY] = give_back
        try:
            return self.app(environ, start_response)  # a stream's body is relayed after this returns
        finally:
            give_back()


def release_turn(environ: dict[str, Any]) -> None:
    """The request is about to wait on something other than its own work: let the next one in."""
    give_back = environ.get(TURN_KEY)
    if give_back is not None:
        give_back()


def _busy(start_response: Callable[..., Any], waited: float) -> list[bytes]:
    error = ModelBusyError(f"this API process is taking in more requests than it can; none got a turn within "
                           f"{waited:g} s; retry shortly")
    return too_many_requests(start_response, error.body(), retry_after=1)
