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
