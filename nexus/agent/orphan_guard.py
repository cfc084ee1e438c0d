"""Run a command that is told to stop when the process that started it dies.

    python -m nexus.agent.orphan_guard celery -A … worker …

The agent starts its Celery workers through this. If the agent is killed
outright (SIGKILL, the OOM killer) its workers would otherwise run on
unsupervised, taking work for a node the master is about to declare offline,
and a restarted agent would start a second set beside them. Linux's parent-death
signal survives exec, so the worker gets SIGTERM (Celery's warm shutdown: it
finishes the running job) the moment its agent is gone. Elsewhere the command
just runs.

    python -m nexus.agent.orphan_guard --nice 5 gunicorn …

runs it at that nice value (inherited by everything it forks and every thread
it starts; on Linux a nice value is per thread, so it is set before there is
more than one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def ask_for_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux


def main(argv: list[str]) -> None:
    if argv[:1] == ["--nice"] and len(argv) > 1:
        os.nice(int(argv[1]))
        argv = argv[2:]
    if not argv:
        sys.exit("usage: python -m nexus.agent.orphan_guard [--nice N] COMMAND [ARGS...]")
    parent = os.getppid()
    ask_for_parent_death_signal()
    if os.getppid() != parent:
        sys.exit(1)  # the parent died before the signal was armed: nobody supervises us
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
