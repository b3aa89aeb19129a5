"""Daemons this machine started in the background, and waiting for a tree to register.

Both the local launcher and the SSH deployer start daemons here (the local tree, or the
master on the front-end) and need the same bookkeeping: a pid file and a log per daemon in a
state directory, "already running" checks that survive pid reuse, and a stop that escalates
from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import gproc
from gproc.client import ClientError, fetch_tree, tree_rows


class LocalDaemons:
    def __init__(self, state: Path):
        self.state = state

    def start(self, name: str, argv: list[str]) -> bool:
        """Start one daemon detached unless it already runs; True when started."""
        if self.pid(name) is not None:
            return False
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                env=with_gproc_on_path(os.environ),
            )
        (self.state / f"{name}.pid").write_text(f"{proc.pid}\n")
        return True

    def pid(self, name: str) -> int | None:
        """The pid of a daemon started here, if it is still alive."""
        try:
            pid = int((self.state / f"{name}.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"gproc" in cmdline and not _zombie(pid) else None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.state.glob("*.pid"))

    def stop(self, names: Iterable[str], grace: float = 5.0) -> list[str]:
        """Stop the named daemons (SIGTERM, then SIGKILL after ``grace``); those that ran."""
        names = list(names)
        pids = {n: p for n in names if (p := self.pid(n)) is not None}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in pids.values():
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in names:
            (self.state / f"{name}.pid").unlink(missing_ok=True)
        return sorted(pids)


def with_gproc_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for ``python -m gproc``, finding the very gproc running now.

    This process may have gproc from a zipapp or a checkout that a child's sys.path would not
    show (the front-end's gproc-deploy wrapper imports it from gproc.pyz).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(gproc.__file__)))
    paths = [root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def live_nodes(uds: str) -> set[str] | None:
    """Names of the nodes the master shows up, or None when no master answers."""
    try:
        tree = fetch_tree(uds)
    except (ClientError, OSError):
        return None
    return {row[1] for row in tree_rows(tree)[1:] if row[4] == "up"}


def wait_registered(uds: str, names: Iterable[str], timeout: float) -> list[str]:
    """Wait until every named node is up in the master's tree; the ones still missing."""
    wanted = set(names)
    deadline = time.monotonic() + timeout
    while True:
        live = live_nodes(uds)
        missing = sorted(wanted - (live or set()))
        if live is not None and not missing:
            return []
        if time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def wait_master(uds: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while live_nodes(uds) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
