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
from collections.abc import Callable
from typing import BinaryIO

from gproc.nodespec import fold

EXIT_LOST = 255
EXIT_TIMEOUT = 124  # a node timed out (-t, -u), as timeout(1) exits

# Longest piece of one line printed under one label; longer lines continue under "node+: ".
MAX_LINE = 1 << 20


# How a line (or a piece of one) reaches whoever shows it: (bytes, cont, newline). ``cont``:
# this piece continues the previous one of the same line; ``newline``: the node's newline came
# right after it. The bytes (bytes, bytearray or memoryview) are valid only during the call.
Chunk = bytes | bytearray | memoryview
Piece = Callable[[Chunk, bool, bool], None]


class _Partial:
    """The part of one node's line on one stream that has come but not yet its newline."""

    __slots__ = ("data", "continued")

    def __init__(self) -> None:
        self.data = bytearray()
        self.continued = False  # pieces of this line were printed already


class Lines:
    """Cuts what each node prints, per node and stream, into lines and pieces of at most
    :data:`MAX_LINE` bytes (module doc); the labelled printer and the JSON one share it."""

    def __init__(self) -> None:
        self.partial: dict[tuple[str, int], _Partial] = {}

    def feed(self, node: str, fd: int, data: bytes, piece: Piece) -> None:
        """Hand ``piece`` every line (or full piece of a long one) that ``data`` completes."""
        pending = self.partial.get((node, fd))
        if pending is None:
            pending = self.partial[(node, fd)] = _Partial()
        first = data.find(b"\n")
        if first < 0:
            pending.data += data
        else:
            # the line that was pending ends here; whole lines follow, then a new partial one
            last = data.rfind(b"\n")
            pending.data += memoryview(data)[:first]
            _pieces(piece, pending.data, pending.continued, True)
            pending.data.clear()
            pending.continued = False
            if last > first:
                for line in data[first + 1 : last].split(b"\n"):
                    _pieces(piece, line, False, True)
            pending.data += memoryview(data)[last + 1 :]
        if len(pending.data) > MAX_LINE:
            # hand out the full pieces now; keep the rest (1 to MAX_LINE bytes) for what follows
            whole = (len(pending.data) - 1) // MAX_LINE * MAX_LINE
            _pieces(piece, memoryview(pending.data)[:whole], pending.continued, False)
            del pending.data[:whole]
            pending.continued = True

    def flush(self, node: str, fd: int, piece: Piece) -> None:
        """Hand out what ``node`` left on ``fd`` without a final newline, and forget it."""
        pending = self.partial.pop((node, fd), None)
        if pending and pending.data:
            _pieces(piece, pending.data, pending.continued, False)

    def nodes(self) -> set[str]:
        """The nodes that have part of a line held."""
        return {node for node, _ in self.partial}


def _pieces(piece: Piece, line: Chunk, cont: bool, newline: bool) -> None:
    """``line`` to ``piece`` in pieces of at most MAX_LINE bytes (one, empty, for "")."""
    if len(line) <= MAX_LINE:  # nearly every line: no view, no loop
        piece(line, cont, newline)
        return
    view = memoryview(line)
    size = len(view)
    for start in range(0, max(size, 1), MAX_LINE):
        end = start + MAX_LINE
        piece(view[start:end], cont or start > 0, newline and end >= size)


def _labelled(out: bytearray, node: bytes) -> Piece:
    """A piece handler appending each piece to ``out`` as a line labelled with ``node``."""

    def piece(line: Chunk, cont: bool, _newline: bool) -> None:
        out.extend(node + (b"+: " if cont else b": "))
        out.extend(line)
        out.extend(b"\n")

    return piece


def unreported(planned: list[str], status: dict[str, int], lost: dict[str, str]) -> list[str]:
    """Planned nodes that neither exited nor were lost by the end: they count as lost."""
    return [n for n in planned if n not in status and n not in lost]


NO_REPORT = "no report from the node"


def job_status(
    status: dict[str, int],
    lost: dict[str, str],
    unreachable: list[str],
    late: dict[str, str] | None = None,
) -> int:
    """The exit status of the whole job (module doc): 255 when a node was lost or could not
    be reached, else 124 when one timed out (-t, -u), else the largest a node returned."""
    if lost or unreachable:
        return EXIT_LOST
    if late:
        return EXIT_TIMEOUT
    return max(status.values(), default=0)


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
        self.lines = Lines()
        self.gathered: dict[str, bytearray] = defaultdict(bytearray)
        self.status: dict[str, int] = {}
        self.lost: dict[str, str] = {}
        self.unreachable: list[str] = []
        self.planned: list[str] = []
        self.late: dict[str, str] = {}  # node -> "start" (-t) or "run" (-u)

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
        out = bytearray()
        self.lines.feed(node, fd, data, _labelled(out, node.encode()))
        if out:
            stream.write(out)
            stream.flush()

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

    def timed_out(self, nodes: list[str], phase: str) -> None:
        for node in nodes:
            self.late.setdefault(node, phase)

    def _flush_node(self, node: str) -> None:
        """Print what a node left without a final newline, as a line of its own."""
        for fd in (1, 2):
            out = bytearray()
            self.lines.flush(node, fd, _labelled(out, node.encode()))
            if out:
                stream = self.err if fd == 2 else self.out
                stream.write(out)
                stream.flush()

    # ------------------------------------------------------------ at the end

    def finish(self) -> int:
        """Print folded output and the summary; return the exit status of the whole job."""
        for node in self.lines.nodes():
            self._flush_node(node)
        self.node_lost(unreported(self.planned, self.status, self.lost), NO_REPORT, now=False)
        if self.folded:
            self._print_folded()
        self._summary()
        return job_status(self.status, self.lost, self.unreachable, self.late)

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
        for node in self.late:
            if by_status.get(EXIT_TIMEOUT) and node in by_status[EXIT_TIMEOUT]:
                by_status[EXIT_TIMEOUT].remove(node)  # said below, as timed out
        lines = [
            f"gproc: exit status {s} on {fold(nodes)}"
            for s, nodes in sorted(by_status.items())
            if nodes
        ]
        for phase, what in (("start", "timed out starting"), ("run", "timed out")):
            late = [n for n, p in self.late.items() if p == phase]
            if late:
                lines.append(f"gproc: {what}: {fold(late)}")
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
