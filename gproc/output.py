"""How the exec client shows what the nodes print, and the one exit status it returns.

Lines are labelled with the node that printed them as they arrive (``kn12: ...``), standard
error to standard error. ``raw`` passes bytes through unlabelled; ``fold`` gathers each node's
standard output and prints identical outputs once at the end under a folded node set
(``kn[1-19]: ...``, as ``clush -b`` does). The exit status is the largest a node returned
(128+signal for a signal); a node that was lost or could not be reached makes it 255, since
what that node would have returned is unknown.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import BinaryIO

from gproc.nodespec import fold

EXIT_LOST = 255


class Printer:
    def __init__(
        self,
        raw: bool = False,
        folded: bool = False,
        out: BinaryIO | None = None,
        err: BinaryIO | None = None,
    ):
        self.raw = raw
        self.folded = folded
        self.out = out or sys.stdout.buffer
        self.err = err or sys.stderr.buffer
        self.partial: dict[tuple[str, int], bytes] = {}
        self.gathered: dict[str, bytearray] = defaultdict(bytearray)
        self.status: dict[str, int] = {}
        self.lost: dict[str, str] = {}
        self.unreachable: list[str] = []
        self.planned: list[str] = []

    # ------------------------------------------------------------ as frames arrive

    def output(self, node: str, fd: int, data: bytes) -> None:
        stream = self.err if fd == 2 else self.out
        if self.raw:
            stream.write(data)
            stream.flush()
            return
        if self.folded and fd == 1:
            self.gathered[node] += data
            return
        buf = self.partial.pop((node, fd), b"") + data
        *lines, rest = buf.split(b"\n")
        label = node.encode() + b": "
        if lines:
            stream.write(b"".join(label + line + b"\n" for line in lines))
            stream.flush()
        if rest:
            self.partial[(node, fd)] = rest

    def exited(self, node: str, status: int) -> None:
        self._flush_node(node)
        self.status[node] = status

    def node_lost(self, nodes: list[str], reason: str) -> None:
        for node in nodes:
            self._flush_node(node)
            self.lost.setdefault(node, reason)

    def _flush_node(self, node: str) -> None:
        for fd in (1, 2):
            rest = self.partial.pop((node, fd), None)
            if rest:
                stream = self.err if fd == 2 else self.out
                stream.write(node.encode() + b": " + rest + b"\n")
                stream.flush()

    # ------------------------------------------------------------ at the end

    def finish(self) -> int:
        """Print folded output and the summary; return the exit status of the whole job."""
        for node in list({n for n, _ in self.partial}):
            self._flush_node(node)
        silent = [n for n in self.planned if n not in self.status and n not in self.lost]
        self.node_lost(silent, "no report from the node")
        if self.folded:
            self._print_folded()
        self._summary()
        worst = max(self.status.values(), default=0)
        if self.lost or self.unreachable:
            return EXIT_LOST
        return worst

    def _print_folded(self) -> None:
        groups: dict[bytes, list[str]] = defaultdict(list)
        for node, data in self.gathered.items():
            groups[bytes(data)].append(node)
        for data, nodes in groups.items():
            label = fold(nodes).encode() + b": "
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            self.out.write(b"".join(label + line + b"\n" for line in lines))
        self.out.flush()

    def _summary(self) -> None:
        by_status: dict[int, list[str]] = defaultdict(list)
        for node, status in self.status.items():
            if status:
                by_status[status].append(node)
        lines = [
            f"gproc: exit status {s} on {fold(nodes)}" for s, nodes in sorted(by_status.items())
        ]
        by_reason: dict[str, list[str]] = defaultdict(list)
        for node, reason in self.lost.items():
            by_reason[reason].append(node)
        lines += [f"gproc: lost {fold(nodes)}: {reason}" for reason, nodes in by_reason.items()]
        lines += [f"gproc: unreachable: {what}" for what in self.unreachable]
        if lines:
            self.err.write("".join(line + "\n" for line in lines).encode())
            self.err.flush()
