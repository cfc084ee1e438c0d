"""What the node's workers are doing, shared with the agent through small files.

The workers are separate processes; each marks the jobs it runs and the
models it holds as one JSON file per entry under the data directory, and the
agent lists them for its heartbeat. Entries of processes that died (killed
mid-job) are ignored and swept, so a crash never leaves a phantom job behind.

    board = ActivityBoard.for_settings(settings)
    with board.running_job(job_id):
        ...                              # the job body
    board.model_loaded("tiny-llama")     # after a backend loaded it
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from nexus.config import Settings

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ActivityBoard:
    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = Path(directory)
        self._pid = os.getpid() if pid is None else pid

    @classmethod
    def for_settings(cls, settings: Settings) -> "ActivityBoard":
        return cls(Path(settings.data_dir).expanduser() / "agent" / "activity")

    @contextmanager
    def running_job(self, job_id: str) -> Iterator[None]:
        self.job_started(job_id)
        try:
            yield
        finally:
            self.job_finished(job_id)

    def job_started(self, job_id: str) -> None:
        self._write("job", job_id)

    def job_finished(self, job_id: str) -> None:
        self._remove("job", job_id)

    def model_loaded(self, model: str) -> None:
        self._write("model", model)

    def model_unloaded(self, model: str) -> None:
        self._remove("model", model)

    def running_jobs(self) -> list[str]:
        return self._live("job")

    def loaded_models(self) -> list[str]:
        return self._live("model")

    def _path(self, kind: str, name: str, pid: int) -> Path:
        return self.directory / f"{kind}-{pid}-{_UNSAFE.sub('_', name)}.json"

    def _write(self, kind: str, name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, name, self._pid)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"kind": kind, "name": name, "pid": self._pid}))
        os.replace(temporary, path)  # the agent never reads half a file

    def _remove(self, kind: str, name: str) -> None:
        self._path(kind, name, self._pid).unlink(missing_ok=True)

    def _live(self, kind: str) -> list[str]:
        names: set[str] = set()
        for path in sorted(self.directory.glob(f"{kind}-*.json")):
            entry = _read(path)
            if entry is None:
                continue
            if psutil.pid_exists(entry["pid"]):
                names.add(entry["name"])
            else:
                path.unlink(missing_ok=True)  # left by a worker that died mid-job
        return sorted(names)


def _read(path: Path) -> dict | None:
    try:
        entry = json.loads(path.read_text())
        return {"name": str(entry["name"]), "pid": int(entry["pid"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # removed meanwhile, or not ours
