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
from gproc.errors import GprocError
from gproc.locales import Host
from gproc.protocol import Tree


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
        # an empty command line is a process in the middle of its exec; another command
        # line is a pid the kernel has handed to someone else since
        return pid if (not cmdline or b"gproc" in cmdline) and not _zombie(pid) else None

    def start_master(self, argv: list[str], uds: str, port: int, timeout: float) -> bool:
        """Start the master unless one of ours runs, and wait until it answers on ``uds``.

        True when it was started now. A master that dies on the way (the port or the socket
        taken, a bad key) is an error quoting the end of its log, and so is another master
        (serving children on another port) answering on ``uds``.
        """
        started = self.start("master", argv)
        deadline = time.monotonic() + timeout
        while True:
            tree = _tree_or_none(uds)
            if tree is not None and not str(tree.get("addr", "")).endswith(f":{port}"):
                raise GprocError(
                    f"another master (children on {tree.get('addr')}) answers on "
                    f"{uds}: stop it, or give another socket"
                )
            if tree is not None:
                return started
            if self.pid("master") is None:
                tail = (self.state / "master.log").read_text(errors="replace").splitlines()[-3:]
                raise GprocError("the master exited at once: " + " / ".join(tail))
            if time.monotonic() >= deadline:
                raise GprocError(
                    f"the master does not answer on {uds} after {timeout:.0f}s; "
                    f"see {self.state / 'master.log'}"
                )
            time.sleep(0.05)

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


def orphans(hosts: Iterable[Host], master: str, live: set[str]) -> dict[str, str]:
    """Hosts whose parent is neither the master, nor in ``hosts``, nor running: host -> parent.

    Such a node would retry its parent forever; better to say so before starting it.
    """
    hosts = list(hosts)
    present = {h.name for h in hosts} | live | {master}
    return {h.name: h.parent for h in hosts if h.parent not in present}


def _tree_or_none(uds: str) -> Tree | None:
    try:
        return fetch_tree(uds)
    except (ClientError, OSError):
        return None


def live_nodes(uds: str) -> set[str] | None:
    """Names of the nodes the master shows up, or None when no master answers."""
    tree = _tree_or_none(uds)
    if tree is None:
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
