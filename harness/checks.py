"""Helpers for the end-to-end tests: run gproc on the front-end, read its labelled output."""

from __future__ import annotations

import re
import subprocess
import threading
from collections import defaultdict
from typing import IO

from .cluster import Cluster, Result
from .netns import NetnsCluster

_LABEL = re.compile(r"^(kn\d+): (.*)$")


def gproc(cluster: Cluster, *args: str, cwd: str = "/root", timeout: float = 120) -> Result:
    """``gproc ARGS`` on the front-end, as a user there would type it."""
    return cluster.exec(["gproc", *args], workdir=cwd, timeout=timeout)


class Running:
    """``gproc ARGS`` started on the front-end; its output is read as it comes, so a test can
    wait for a line a job prints (the job has started on every node) before it acts."""

    def __init__(self, cluster: Cluster | NetnsCluster, *args: str, cwd: str = "/root"):
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        if isinstance(cluster, NetnsCluster):
            self.proc = cluster.popen(["gproc", *args], **pipes)
        else:
            front = cluster.container_name(cluster.require_plan().front_end)
            cmd = ["docker", "exec", "-w", cwd, front, "gproc", *args]
            self.proc = subprocess.Popen(cmd, **pipes)
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[bytes], into: list[str]) -> None:
        for line in stream:
            into.append(line.decode(errors="replace"))

    def saying(self, text: str) -> set[str]:
        """The nodes that have printed the line ``text`` so far."""
        lines = Result(0, "".join(self._out), "").lines()
        return {m.group(1) for m in map(_LABEL.match, lines) if m and m.group(2) == text}

    def wait(self, timeout: float = 120) -> Result:
        """The whole result once gproc has ended; a gproc still running after ``timeout``
        is killed and the test fails, naming what it had printed."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"gproc still running after {timeout:g}s; it printed:\n{''.join(self._out)}"
                f"{''.join(self._err)}"
            ) from None
        for reader in self._readers:
            reader.join()
        return Result(status, "".join(self._out), "".join(self._err))


def by_node(result: Result) -> dict[str, list[str]]:
    """Output lines grouped by the node that printed them; unlabelled lines fail loudly."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in result.lines():
        match = _LABEL.match(line)
        assert match, f"unlabelled output line {line!r}"
        out[match.group(1)].append(match.group(2))
    return dict(out)


def names(first: int, last: int) -> set[str]:
    return {f"kn{n}" for n in range(first, last + 1)}


# Prints "PID ARGV" for every gproc daemon: the zipapp run by python (a node, the harness's
# wrapper) or ``python -m gproc`` (the master gproc-deploy starts on the front-end).
_GPROC_PS = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\\0") if a]
    except OSError:
        continue
    if any(a.endswith("gproc.pyz") for a in args[1:2]) or args[1:3] == ["-m", "gproc"]:
        print(pid, " ".join(args))
"""


def gproc_processes(cluster: Cluster) -> dict[str, list[str]]:
    """Host -> the gproc processes running there (front-end and every node), the ground truth."""
    plan = cluster.require_plan()
    hosts = [plan.front_end, *(n.name for n in plan.nodes)]
    found = cluster.pool(lambda h: cluster.exec(["python3", "-c", _GPROC_PS], host=h), hosts)
    return {h: r.lines() for h, r in zip(hosts, found, strict=True) if r.lines()}


def kill_gproc(cluster: Cluster) -> None:
    """SIGKILL every gproc process on every host: what a failed test may leave behind."""
    kill = (
        "import contextlib, os, signal, sys\n"
        "for p in sys.argv[1:]:\n"
        "    with contextlib.suppress(ProcessLookupError):\n"
        "        os.kill(int(p), signal.SIGKILL)\n"
    )
    for host, rows in gproc_processes(cluster).items():
        cluster.exec(["python3", "-c", kill, *(row.split()[0] for row in rows)], host=host)
