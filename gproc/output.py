"""How the exec client shows what the nodes print, and the one exit status it returns.

Lines are labelled with the node that printed them as they arrive (``kn12: ...``), standard
error to standard error. ``raw`` passes bytes through unlabelled; ``fold`` gathers each node's
standard output and prints identical outputs once at the end under a folded node set
(``kn[1-19]: ...``, as ``clush -b`` does). The exit status is the largest a node returned
(128+signal for a signal); a node that was lost or could not be reached makes it 255, since
what that node would have returned is unknown.

A line is printed once its newline arrives, so the part of a line that has come so far is
held per node and stream, in a bytearray that each chunk extends (a chunk costs its own size,
however long the line already is). What is held is bounded: a line longer than
:data:`MAX_LINE` (1 MiB) is printed in pieces of :data:`MAX_LINE` bytes as they fill, the
first labelled ``kn12: `` and each continuation ``kn12+: `` (``+`` is in no node name), each
piece ending in a newline. So a node that never prints a newline still shows its output as it
goes, the client holds at most 1 MiB plus one chunk per node and stream, and every line of
labelled output starts with its node. The pieces depend only on the line, not on how the
frames cut it. Lines up to 1 MiB, which is what a person reads, come out whole; whoever needs
longer lines byte for byte uses ``-raw``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import BinaryIO

from gproc.nodespec import fold

EXIT_LOST = 255

# Longest piece of one line printed under one label; longer lines continue under "node+: ".
MAX_LINE = 1 << 20


class _Partial:
    """The part of one node's line on one stream that has come but not yet its newline."""

    __slots__ = ("data", "continued")

    def __init__(self) -> None:
        self.data = bytearray()
        self.continued = False  # pieces of this line were printed already


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
        self.partial: dict[tuple[str, int], _Partial] = {}
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
        pending = self.partial.get((node, fd))
        if pending is None:
            pending = self.partial[(node, fd)] = _Partial()
        label = node.encode()
        out = bytearray()
        first = data.find(b"\n")
        if first < 0:
            pending.data += data
        else:
            # the line that was pending ends here; whole lines follow, then a new partial one
            last = data.rfind(b"\n")
            pending.data += memoryview(data)[:first]
            self._line(out, label, pending.data, pending.continued)
            pending.data.clear()
            pending.continued = False
            if last > first:
                for line in data[first + 1 : last].split(b"\n"):
                    self._line(out, label, line, False)
            pending.data += memoryview(data)[last + 1 :]
        if len(pending.data) > MAX_LINE:
            # print the full pieces now; keep the rest (1 to MAX_LINE bytes) for what follows
            whole = (len(pending.data) - 1) // MAX_LINE * MAX_LINE
            self._line(out, label, memoryview(pending.data)[:whole], pending.continued)
            del pending.data[:whole]
            pending.continued = True
        if out:
            stream.write(out)
            stream.flush()

    @staticmethod
    def _line(
        out: bytearray, node: bytes, line: bytes | bytearray | memoryview, cont: bool
    ) -> None:
        """Append ``line`` labelled with ``node``, in pieces of at most MAX_LINE bytes."""
        view = memoryview(line)
        for start in range(0, max(len(view), 1), MAX_LINE):
            out += node + (b"+: " if cont or start else b": ")
            out += view[start : start + MAX_LINE]
            out += b"\n"

    def exited(self, node: str, status: int) -> None:
        self._flush_node(node)
        self.status[node] = status

    def node_lost(self, nodes: list[str], reason: str, now: bool = True) -> None:
        """Note lost nodes; say so at once (``now``), as the rest of the job may run for long.

        On a thousand nodes a rack master that dies mid-job is news the user needs then, not
        after the job; the summary at the end lists every lost node again.
        """
        new = [node for node in nodes if node not in self.lost]
        for node in nodes:
            self._flush_node(node)
            self.lost.setdefault(node, reason)
        if new and now:
            self.err.write(f"gproc: lost {fold(new)}: {reason}\n".encode())
            self.err.flush()

    def _flush_node(self, node: str) -> None:
        """Print what a node left without a final newline, as a line of its own."""
        for fd in (1, 2):
            pending = self.partial.pop((node, fd), None)
            if pending and pending.data:
                out = bytearray()
                self._line(out, node.encode(), pending.data, pending.continued)
                stream = self.err if fd == 2 else self.out
                stream.write(out)
                stream.flush()

    # ------------------------------------------------------------ at the end

    def finish(self) -> int:
        """Print folded output and the summary; return the exit status of the whole job."""
        for node in list({n for n, _ in self.partial}):
            self._flush_node(node)
        silent = [n for n in self.planned if n not in self.status and n not in self.lost]
        self.node_lost(silent, "no report from the node", now=False)
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


# ``gproc i`` prints one row per node up to this many nodes; above, one line per tree level
# and state with the names folded (kn[1-19,21-39,...]): 1,000 rows are read by nobody.
FOLD_ABOVE = 100


def fold_levels(rows: list[tuple[str, str, str, int, str]], width: int = 100) -> str:
    """The tree of ``gproc i`` folded by level and state (rows: path, name, address, level,
    state, the master first), with the same last line as the full table."""
    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for _, name, _, level, state in rows[1:]:
        groups[(level, state)].append(name)
    lines = ["LEVEL  NODES  STATE  NAMES", f"{0:<5}  {1:>5}  {rows[0][4]:<5}  {rows[0][1]}"]
    for (level, state), names in sorted(groups.items()):
        head = f"{level:<5}  {len(names):>5}  {state:<5}  "
        lines += _wrapped(head, fold(names), width)
    up = sum(1 for r in rows[1:] if r[4] == "up")
    lines.append(f"{len(rows) - 1} nodes below {rows[0][1]}: {up} up, {len(rows) - 1 - up} lost")
    return "\n".join(lines)


def _wrapped(head: str, text: str, width: int) -> list[str]:
    """``head`` then ``text``, broken after commas to fit ``width``, continuations indented."""
    lines, line = [], head
    for piece in text.split(","):
        candidate = piece if line in (head, " " * len(head)) else f",{piece}"
        if len(line) + len(candidate) >= width and line not in (head, " " * len(head)):
            lines.append(line + ",")
            line, candidate = " " * len(head), piece
        line += candidate
    return [*lines, line]
