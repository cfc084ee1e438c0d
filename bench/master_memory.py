"""The master's memory at rest: RSS, PSS and USS of every process of the API, the reconciler and Flower.

    python bench/master_memory.py [--rest 20] [--samples 3] [--keep] [--source CHECKOUT]

Starts `nexus dev -n 1 --no-model` in a fresh data directory (its own PostgreSQL, Redis and S3
servers), waits until the cluster is announced and then `--rest` seconds more, and reads
/proc/PID/smaps_rollup of each process `--samples` times, a few seconds apart (the figures are the
last sample; the spread says whether it was at rest). The counted total is the processes started
by the `nexus master`, `nexus reconciler` and `nexus flower` children and their descendants; the
verifier, the agent and its worker, and the servers are listed apart.

RSS counts pages shared between processes (a forked gunicorn worker and its arbiter, the
interpreter's libraries) once in each; PSS splits each shared page between its sharers, so the
sum of PSS is what the processes take together; USS is each process's own pages. "Resident
together" counts each physical page that any counted process has resident once (the union, read
from /proc/PID/pagemap; as root only, since the kernel hides page frame numbers from others): what
a memory cgroup holding just these processes would be charged for them.

`--source` runs another checkout's `nexus` (e.g. main, for a before/after on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1  # bits 0-54 of a pagemap entry
COUNTED = ("master", "reconciler", "flower")  # `nexus <command>` children whose trees are counted


@dataclass
class Memory:
    pid: int
    label: str
    counted: bool
    rss: int  # KiB
    pss: int
    uss: int


def smaps_rollup(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[-1] == "kB":
            values[name] = int(fields[0])
    return values


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def cmdline(pid: int) -> list[str]:
    return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]


def label(argv: list[str]) -> str:
    """A short name for a process of the cluster, from its command line."""
    text = " ".join(argv)
    if "-m nexus " in text or text.endswith("-m nexus"):
        after = text.split("-m nexus", 1)[1].split()
        return "nexus " + (after[0] if after else "")
    if "gunicorn" in text:
        app = argv[-1]
        return "gunicorn " + ("node API" if "node" in app else "user API")
    if "celery" in text:
        return "celery worker"
    return os.path.basename(argv[0]) if argv else "?"


def tree(root: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of root and its descendants."""
    pids, todo = [], [(root, 0)]
    while todo:
        pid, parent = todo.pop()
        pids.append((pid, parent))
        todo += [(c, pid) for c in children(pid)]
    return pids


def measure(launcher: int) -> list[Memory]:
    rows = []
    for child in children(launcher):
        try:
            top = label(cmdline(child))
        except FileNotFoundError:
            continue
        counted = top.removeprefix("nexus ") in COUNTED
        names: dict[int, str] = {}
        for pid, parent in tree(child):
            try:
                argv, values = cmdline(pid), smaps_rollup(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            name = names[pid] = label(argv)
            if names.get(parent) == name:  # a forked worker carries its parent's command line
                name += " (worker)"
            uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
            rows.append(Memory(pid, name, counted, values["Rss"], values["Pss"], uss))
    return rows


def resident_together(pids: list[int]) -> float | None:
    """MiB of distinct physical pages resident in any of `pids`; None where page frames are hidden."""
    frames: set[int] = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start >= 1 << 47:  # [vsyscall]: not readable through pagemap
                    continue
                pagemap.seek(start // PAGE * 8)
                entries = pagemap.read((end - start) // PAGE * 8)
                for (entry,) in struct.iter_unpack("<Q", entries):
                    if entry >> 63:  # present
                        frames.add(entry & PFN_MASK)
    if frames <= {0}:
        return None
    return len(frames) * PAGE / 2**20


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            sys.exit(f"nexus dev exited with {proc.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"no {path} after {timeout:.0f} s")
        time.sleep(0.5)


def report(rows: list[Memory]) -> dict[str, float]:
    mib = 1024
    print(f"{'process':34} {'pid':>7} {'RSS MiB':>8} {'PSS MiB':>8} {'USS MiB':>8}")
    for counted in (True, False):
        print("-- API + reconciler + Flower --" if counted else "-- not counted (verifier, node, servers) --")
        for r in sorted((r for r in rows if r.counted == counted), key=lambda r: r.label):
            print(f"{r.label:34} {r.pid:7} {r.rss / mib:8.1f} {r.pss / mib:8.1f} {r.uss / mib:8.1f}")
    mine = [r for r in rows if r.counted]
    total = {k: sum(getattr(r, k) for r in mine) / mib for k in ("rss", "pss", "uss")}
    print(f"{'TOTAL API + reconciler + Flower':34} {len(mine):7} {total['rss']:8.1f} {total['pss']:8.1f} "
          f"{total['uss']:8.1f}")
    together = resident_together([r.pid for r in mine])
    if together is not None:
        total["together"] = together
        print(f"{'resident together (each page once)':34} {len(mine):7} {together:8.1f}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rest", type=float, default=20.0, help="seconds to wait after the cluster is up")
    parser.add_argument("--samples", type=int, default=3, help="readings, 5 s apart; the last is printed")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--json", action="store_true", help="also print the totals as one JSON line")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose nexus runs (default: this one)")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="nexus-memory-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_API_PORT"] = str(_free_port())
    env["NEXUS_FLOWER_PORT"] = str(_free_port())
    env["PYTHONPATH"] = str(args.source.resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(data_dir / "dev.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nexus", "dev", "-n", "1", "--no-model", "--data-dir",
                             str(data_dir)], env=env, cwd=data_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # cwd: `-m` puts it first on sys.path, before --source
    try:
        wait_for(data_dir / "cluster.json", proc, 180)
        time.sleep(args.rest)
        totals = []
        for i in range(args.samples):
            if i:
                time.sleep(5)
            rows = measure(proc.pid)
            totals.append(sum(r.rss for r in rows if r.counted) / 1024)
        total = report(rows)
        print(f"RSS totals over {args.samples} samples: " + ", ".join(f"{t:.1f}" for t in totals) + " MiB")
        if args.json:
            print(json.dumps({k: round(v, 1) for k, v in total.items()}))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"data kept in {data_dir}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
