"""Local trees of real gproc daemons on loopback, one per test module (or per test when the
test breaks its tree), each with its own ports, Unix socket, binRoot and cluster key."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gproc.deploy.local import LocalTree, Settings

# wait_until is shared with the harness tests (harness/waiting.py imports only the standard
# library). The checkout's root goes at the END of sys.path: the gproc under test stays the
# installed one, and only `harness`, which is never installed, is found there.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from harness.waiting import wait_until as wait_until  # noqa: E402 - re-exported for tests


def free_port_block(count: int) -> int:
    """A base port such that base..base+count are all free on loopback right now.

    Below the kernel's ephemeral range: a port there that is free now may be the local end of
    another tree's new connection by the time the daemon binds it (a daemon of a tree then
    failed with "address already in use" and never registered).
    """
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))
    top = min(ephemeral_low(), 60000) - count
    for _ in range(200):
        base = rng.randrange(max(top - 20000, 1024), top)
        try:
            for port in range(base, base + count + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports on loopback")


def ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class Tree:
    """A running local tree and how to talk to it."""

    launcher: LocalTree
    root: Path
    nodes: int

    @property
    def uds(self) -> str:
        return self.launcher.settings.uds

    @property
    def bin_root(self) -> Path:
        return Path(self.launcher.settings.bin_root)

    def switches(self) -> list[str]:
        s = self.launcher.settings
        return [
            "-defaultMasterUDS",
            s.uds,
            "-cmdport",
            str(s.cmdport),
            "-key",
            str(s.key),
            "-binRoot",
            s.bin_root,
            "-racksize",
            str(s.racksize),
        ]

    def gproc(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run ``gproc`` against this tree; switches before the mode are added."""
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)  # no input unless the test gives it
        return subprocess.run(
            [sys.executable, "-m", "gproc", *self.switches(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=kw.pop("cwd", self.root),
            **kw,
        )

    def gproc_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gproc", *self.switches(), *args]

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(
            [sys.executable, "-m", "gproc", *self.switches(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
            **kw,
        )

    def pid(self, name: str) -> int:
        pid = self.launcher.pid(name)
        assert pid is not None, f"{name} is not running"
        return pid


def start_tree(
    root: Path,
    nodes: int = 8,
    racksize: int = 4,
    heartbeat: float = 5.0,
    allow: str = "owner",
    launcher: type[LocalTree] = LocalTree,
    reconnect: float = 0.0,
) -> Tree:
    """A tree of real daemons under ``root``; ``launcher`` may wrap how each one starts."""
    root.mkdir(parents=True, exist_ok=True)
    base = free_port_block(nodes)
    settings = Settings(
        cmdport=base,
        uds=str(root / "master.sock"),
        bin_root=str(root / "xproc"),
        racksize=racksize,
        key=str(root / "cluster.key"),
        debug=1,
        heartbeat=heartbeat,
        allow=allow,
        reconnect=reconnect,
    )
    started = launcher(settings, state=root / "state")
    try:
        started.up(1, nodes, timeout=90, say=lambda _msg: None)  # a deadline: loaded CI is slow
    except BaseException:
        started.down()  # the daemons that did start would outlive the failed test
        raise
    return Tree(started, root, nodes)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    """An 8-node local tree (rack size 4) shared by the tests of one module."""
    t = start_tree(tmp_path_factory.mktemp("tree"))
    yield t
    t.launcher.down()
    assert_clean_logs(t)


@pytest.fixture
def own_tree(tmp_path: Path) -> Iterator[Tree]:
    """An 8-node tree for one test that breaks it (kills a daemon, say)."""
    t = start_tree(tmp_path / "tree")
    yield t
    t.launcher.down()
    assert_clean_logs(t)


def assert_clean_logs(t: Tree) -> None:
    """Whatever the tests threw at them, the daemons logged reasons, never a traceback."""
    for log in (t.root / "state").glob("*.log"):
        text = log.read_text()
        for sign in ("Traceback", "exception was never retrieved", "was destroyed but"):
            assert sign not in text, f"{log.name}: {sign}\n{text[-3000:]}"


def labelled(stdout: str) -> dict[str, list[str]]:
    """Lines of labelled output, grouped by node label."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        node, sep, text = line.partition(": ")
        assert sep, f"unlabelled line {line!r}"
        out.setdefault(node, []).append(text)
    return out


is_root = os.geteuid() == 0
