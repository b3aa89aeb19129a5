"""A daemon's own pid file: its pid and its start time, so a stop kills only this daemon.

A pid alone names whatever process the kernel handed that number to since; the pair (pid,
start time in clock ticks since boot, field 22 of ``/proc/PID/stat``) names one process
for the machine's uptime. The daemon writes the file itself once it serves (so a file that
exists says a daemon got that far), under a temporary name renamed into place, and removes
it when it stops, if the file still names it.
"""

from __future__ import annotations

import contextlib
import os


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "(comm) ", from field 3 on
    return int(fields[19]) if len(fields) > 19 else None


def write(path: str) -> None:
    """``PID START`` of this process at ``path``, atomically."""
    pid = os.getpid()
    tmp = f"{path}.tmp-{pid}"
    with open(tmp, "w") as f:
        f.write(f"{pid} {start_time(pid)}\n")
    os.replace(tmp, path)


def remove_if_mine(path: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            pid = int(f.read().split()[0])
        if pid == os.getpid():
            os.unlink(path)
