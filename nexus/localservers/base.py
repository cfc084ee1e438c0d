"""What every local server has in common: a child process, a data folder, a log.

A `LocalServer` subclass says how to prepare its folder, which command runs the
server in the foreground, and how to tell that it really answers. The base class
starts it on 127.0.0.1, waits (bounded) until it answers, and stops it cleanly,
killing its whole process group if it does not stop in time.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A server did not answer in time or exited while starting; the message ends with its log tail."""


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it; a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: a port whose last connections linger in TIME_WAIT is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _die_with_parent() -> None:
    # Linux only: the kernel sends SIGTERM to the server when the process (thread)
    # that started it dies, so a crashed test run or launcher leaves no orphans.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LocalServer(ABC):
    """One server process bound to 127.0.0.1 with its data under `data_dir`."""

    name = "server"
    stop_signal = signal.SIGTERM  # the server's own "shut down cleanly" signal

    def __init__(self, data_dir: str | Path, port: int | None = None, *, start_timeout: float = 30.0,
                 die_with_parent: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.host = HOST
        self.start_timeout = start_timeout
        # The kernel ties the server's life to the *thread* that starts it: start
        # long-lived servers from the main thread, or pass die_with_parent=False.
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen | None = None

    # --- what a subclass provides -------------------------------------------------
    @abstractmethod
    def _prepare(self) -> None:
        """Create or reuse the data folder and config files (idempotent)."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The foreground command line that runs the server."""

    @abstractmethod
    def _answers(self) -> bool:
        """True once the server answers a real request from a real client."""

    @property
    @abstractmethod
    def url(self) -> str:
        """How clients reach it."""

    def _popen_kwargs(self) -> dict:
        return {}

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        if self.is_running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self._spawn()
        self._wait_until_answering()
        return self

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,  # our own group: Ctrl-C goes to the launcher, which stops us in order
                preexec_fn=_die_with_parent if self.die_with_parent else None, **self._popen_kwargs(),
            )

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ServerStartError(f"{self.name} on port {self.port} exited with code {code} while starting; "
                                       f"log {self.log_path}:\n{log_tail(self.log_path)}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.name} on port {self.port} did not answer within "
                                       f"{self.start_timeout:.0f} s; log {self.log_path}:\n{log_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the server to shut down cleanly; kill its process group if it has not within `timeout`."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(process)

    def kill(self) -> None:
        """Crash the server on purpose (SIGKILL to its whole group): for failure tests."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._kill_group(process)

    @staticmethod
    def _kill_group(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.url} {state} data={self.data_dir}>"
