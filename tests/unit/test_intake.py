"""Intake turns (nexus.api.intake): a bounded number of /v1 requests taken in at once, the rest wait in
turn, none is lost below the bound, and a wait past it is a 429 in OpenAI's shape."""

from __future__ import annotations

import json
import threading

from nexus.api.intake import IntakeTurns, release_turn


class Held:
    """A WSGI app whose requests stay inside until let go (or give their turn back first)."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.go = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        if environ.get("give_back_early"):
            release_turn(environ)
        self.go.wait(10)
        with self._lock:
            self.inside -= 1
        start_response("200 OK", [])
        return [b"ok"]


def _call(app, path="/v1/completions", method="POST", **extra):
    answer = {}

    def start_response(status, headers):
        answer["status"] = status

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path, **extra}, start_response))
    return answer["status"], body


def _in_threads(app, count, **extra):
    results, threads = [], []
    for _ in range(count):
        thread = threading.Thread(target=lambda: results.append(_call(app, **extra)))
        thread.start()
        threads.append(thread)
    return results, threads


def test_requests_beyond_the_turns_wait_and_are_all_answered():
    held = Held()
    app = IntakeTurns(held, turns=2, wait_seconds=10)
    results, threads = _in_threads(app, 6)
    threading.Timer(0.3, held.go.set).start()
    for thread in threads:
        thread.join(15)
    assert [status for status, _ in results] == ["200 OK"] * 6
    assert held.most_inside == 2


def test_no_turn_within_the_wait_is_a_429_in_openai_shape():
    held = Held()
    app = IntakeTurns(held, turns=1, wait_seconds=0.2)
    results, threads = _in_threads(app, 1)
    while held.inside == 0:
        threading.Event().wait(0.01)
    status, body = _call(app)
    assert status.startswith("429")
    error = json.loads(body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "turn" in error["message"]
    held.go.set()
    threads[0].join(15)
    assert results == [("200 OK", b"ok")]


def test_a_request_that_gives_its_turn_back_lets_the_next_in_while_it_still_runs():
    held = Held()
    app = IntakeTurns(held, turns=1, wait_seconds=0.5)
    results, threads = _in_threads(app, 3, give_back_early=True)
    threading.Event().wait(0.5)
    assert held.inside == 3  # all three inside at once with one turn
    held.go.set()
    for thread in threads:
        thread.join(15)
    assert [status for status, _ in results] == ["200 OK"] * 3


def test_other_routes_take_no_turn():
    held = Held()

    def routes(environ, start_response):  # only the completion is held
        if environ["PATH_INFO"] == "/v1/completions":
            return held(environ, start_response)
        start_response("200 OK", [])
        return [b"ok"]

    app = IntakeTurns(routes, turns=1, wait_seconds=0.1)
    results, threads = _in_threads(app, 1)
    while held.inside == 0:
        threading.Event().wait(0.01)
    # The only turn is taken: these pass straight through (a turn would have been refused after 0.1 s).
    assert _call(app, path="/v1/models", method="GET")[0] == "200 OK"
    assert _call(app, path="/api/v1/jobs")[0] == "200 OK"
    assert _call(app, path="/v1/chat/completions", method="GET")[0] == "200 OK"
    assert _call(app, path="/v1/embeddings")[0].startswith("429")  # a /v1 request: it needs a turn
    held.go.set()
    threads[0].join(15)
