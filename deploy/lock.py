"""One gproc-deploy run at a time per front-end tree: a lock file in the run's state directory.

Two runs at once would interleave uploads and start two daemons on a node. The second run
waits a bounded time for the first, then refuses, naming the holder (its pid, command line
and start), which the holder writes into the lock file once it has it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gproc.errors import GprocError


class Busy(GprocError):
    """Another gproc-deploy run holds the lock; the message names it."""


@contextlib.contextmanager
def run_lock(state: Path, wait: float, say: Callable[[str], None]) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    path = state / "deploy.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise Busy(
                        f"another gproc-deploy run holds {path} ({holder}); waited "
                        f"{wait:.0f}s: let it finish, or give --lock-wait more seconds"
                    ) from None
                if not told:
                    say(f"waiting up to {wait:.0f}s for another gproc-deploy run ({holder})")
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        since = time.strftime("%H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock
