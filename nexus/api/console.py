"""The web console: static files under /ui/, shipped in the package (nexus/api/ui/), no build step.

The page holds no data of its own: its scripts call the public API with the user's token,
as any client does, so the console can show nothing a token may not read. Serving it costs
other requests nothing: no hook of the app's, only these two routes, and the token check
passes them by the same lookup that passes health.
"""

from __future__ import annotations

from pathlib import Path

from apiflask import APIBlueprint
from flask import Response, redirect, send_from_directory, url_for

from nexus.api.security import public

UI_DIR = Path(__file__).parent / "ui"

# The page runs only its own scripts and talks only to this origin; nothing may frame it
# (clickjacking the admin's buttons), and no address it opens learns the page's (?token= once was in it).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
MAX_AGE_SECONDS = 60  # files change with the package; revalidated by ETag after this
# Set, not guessed from the host's mime.types: a module script served as anything else is refused by the browser.
MIME_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

bp = APIBlueprint("console", __name__, url_prefix="/ui", enable_openapi=False)


@bp.get("")
@public
def bare():
    return redirect(url_for("console.page"), code=308)


@bp.get("/")
@public
def page() -> Response:
    return _file("index.html")


@bp.get("/<path:name>")
@public
def asset(name: str) -> Response:
    return _file(name)


def _file(name: str) -> Response:
    # send_from_directory refuses paths outside UI_DIR (404), and answers 304 to a matching ETag.
    response = send_from_directory(UI_DIR, name, max_age=MAX_AGE_SECONDS, mimetype=MIME_TYPES.get(Path(name).suffix))
    response.headers.update(HEADERS)
    return response
