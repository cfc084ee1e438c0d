"""gunicorn's access log without secrets: a console link (`/ui/?token=...`) must not write the token
into the log, where every token is otherwise kept out (only hashes are stored)."""

from __future__ import annotations

import re

from gunicorn.glogging import Logger

_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&])token=)[^&\s]*")


def redact(text: str | None) -> str | None:
    return _TOKEN_IN_QUERY.sub(r"\1***", text) if text and "token=" in text else text


class AccessLogger(Logger):
    """Redacts `token=` from the request line and query string; everything else as gunicorn logs it."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["r"], atoms["q"] = redact(atoms["r"]), redact(atoms["q"])
        return atoms
