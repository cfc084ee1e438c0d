"""The console's server side: its files under /ui/ (public, locked down, in the package), GET /tokens/self,
and that serving it adds nothing to the other requests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from nexus import auth
from nexus.api import console, create_app
from nexus.auth import Role
from tests.conftest import auth as bearer


def test_the_page_and_its_modules_are_served_without_a_token_and_locked_down(api):
    page = api.get("/ui/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'src="app.js"' in page.data
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer" and page.headers["X-Frame-Options"] == "DENY"
    for name in ("app.js", "api.js", "dom.js", "views/cluster.js", "views/jobs.js", "views/playground.js"):
        module = api.get(f"/ui/{name}")
        assert module.status_code == 200 and module.mimetype == "text/javascript", name
    assert api.get("/ui/console.css").mimetype == "text/css"
    assert api.get("/ui").status_code == 308 and api.get("/ui").headers["Location"].endswith("/ui/")


def test_files_outside_the_console_folder_are_not_served(api):
    for path in ("/ui/../console.py", "/ui/%2e%2e/console.py", "/ui/..%2fconsole.py", "/ui/nothing.js"):
        response = api.get(path)
        assert response.status_code == 404, path
        assert response.json["error"]["code"] == "not_found"


def test_tokens_self_says_who_the_caller_is_and_needs_a_token(api, services):
    with services.engine.begin() as conn:
        token, _row = auth.create_token(conn, "console-user", Role.SUBMITTER, "tenant-c")
    me = api.get("/api/v1/tokens/self", headers=bearer(token))
    assert me.status_code == 200
    assert {k: me.json[k] for k in ("name", "role", "tenant")} == {"name": "console-user", "role": "submitter",
                                                                    "tenant": "tenant-c"}
    assert token not in me.text
    assert api.get("/api/v1/tokens/self").status_code == 401
    assert api.get("/api/v1/tokens/self", headers=bearer("nx_not-a-token")).status_code == 401


def test_serving_the_console_adds_no_hook_and_no_route_outside_ui(services):
    without = create_app(services.settings, services, blueprints=_blueprints_but_console())
    with_console = create_app(services.settings, services)
    # Hooks are kept per blueprint (None: the whole app); the console's own run only for /ui/ requests.
    for hooks in ("before_request_funcs", "after_request_funcs", "teardown_request_funcs", "url_value_preprocessors",
                  "url_default_functions", "template_context_processors"):
        assert {k: len(v) for k, v in getattr(without, hooks).items()} == \
               {k: len(v) for k, v in getattr(with_console, hooks).items() if k != "console"}, hooks
        assert not getattr(with_console, hooks).get("console") or hooks == "template_context_processors", hooks
    added = {r.rule for r in with_console.url_map.iter_rules()} - {r.rule for r in without.url_map.iter_rules()}
    assert added and all(rule == "/ui" or rule.startswith("/ui/") for rule in added - {"/api/v1/tokens/self"})


def _blueprints_but_console():
    from nexus.api.app import _blueprints

    return [bp for bp in _blueprints() if bp is not console.bp]


@pytest.mark.timeout(240)
def test_the_console_files_are_in_the_built_wheel(tmp_path):
    root, source = console.UI_DIR.parents[2], tmp_path / "source"  # built from a copy: no build/ left in the tree
    shutil.copytree(root / "nexus", source / "nexus", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("nexus_cluster-*.whl")  # the distribution nexus-cluster
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(root)) for p in console.UI_DIR.rglob("*") if p.is_file()}
    assert shipped and shipped <= names, shipped - names
