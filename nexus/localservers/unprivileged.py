"""PostgreSQL refuses to run as root; when we are root (CI is), run it as `nexus-pg`.

The system user is created once with `useradd`. It must be able to reach the
PostgreSQL binaries and the data folder, so folders on the way that others cannot
traverse get the execute bit for others (traverse only: no listing, no reading).
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "nexus-pg"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunAs:
    """Popen keyword arguments that drop to `user` (empty when we are not root)."""

    user: str | None

    def popen_kwargs(self) -> dict:
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": entry.pw_dir or "/", "USER": self.user, "LOGNAME": self.user}}

    def own(self, path: Path) -> None:
        """Give `path` (recursively) to the service user and make every parent traversable for it."""
        if self.user is None:
            return
        entry = pwd.getpwnam(self.user)
        os.lchown(path, entry.pw_uid, entry.pw_gid)
        for root, dirs, files in os.walk(path):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
        make_traversable(path.parent)


def run_as_for_postgres() -> RunAs:
    if os.geteuid() != 0:
        return RunAs(None)
    ensure_service_user(SERVICE_USER)
    return RunAs(SERVICE_USER)


def ensure_service_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True, text=True)
        log.info("created system user %s to run PostgreSQL (it refuses to run as root)", name)


def make_traversable(path: Path) -> None:
    """Add o+x to `path` and each parent that lacks it, so an unprivileged user can reach what lies below."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            log.warning("added traverse permission (o+x) to %s so %s can reach PostgreSQL files", folder, SERVICE_USER)
