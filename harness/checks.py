"""Helpers for the end-to-end tests: run gproc on the front-end, read its labelled output."""

from __future__ import annotations

import re
from collections import defaultdict

from .cluster import Cluster, Result

_LABEL = re.compile(r"^(kn\d+): (.*)$")


def gproc(cluster: Cluster, *args: str, cwd: str = "/root", timeout: float = 120) -> Result:
    """``gproc ARGS`` on the front-end, as a user there would type it."""
    return cluster.exec(["gproc", *args], workdir=cwd, timeout=timeout)


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
