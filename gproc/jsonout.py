"""``gproc e -json``: every event of a job as one JSON object per line on standard output.

Scripts and CI read this instead of parsing labels. The schema is ``docs/OUTPUT.md``; every
object carries ``"v"`` (:data:`VERSION`) and ``"event"``, and :data:`EVENTS` lists each
event's fields. Within version 1 fields may be added, never renamed or removed, so a reader
must ignore what it does not know.

Output is cut into lines by the same :class:`gproc.output.Lines` as labelled output: a line
is one ``output`` event once its newline arrives, a line longer than
:data:`gproc.output.MAX_LINE` comes in pieces (every piece after the first has
``"cont": true``), and what a node leaves without a newline comes when it exits. The bytes
are ``text`` when they are valid UTF-8, else ``base64``, so no byte is lost or replaced.

:class:`JsonPrinter` has :class:`gproc.output.Printer`'s interface, so the client only
chooses one. A new event is one small method (keep the books, flush the node's held line if
the node is done, then :meth:`JsonPrinter._emit`), its fields in :data:`EVENTS` and a section
in docs/OUTPUT.md; tests/test_json.py checks that every event and field is documented.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from typing import Any, BinaryIO

from gproc.output import NO_REPORT, Chunk, Lines, job_status, unreported

VERSION = 1

# Fields of each event besides "v" and "event" (docs/OUTPUT.md describes each one).
EVENTS: dict[str, tuple[str, ...]] = {
    "plan": ("nodes",),
    "unreachable": ("what",),
    "output": ("node", "stream", "text", "base64", "cont", "newline"),
    "exit": ("node", "status"),
    "lost": ("nodes", "reason"),
    "timeout": ("nodes", "phase"),
    "summary": ("status", "counts", "ok", "failed", "lost", "unreachable", "timed_out"),
}

STREAMS = {1: "stdout", 2: "stderr"}


def natural(name: str) -> tuple[Any, ...]:
    """Sort key that puts n2 before n10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


class JsonPrinter:
    def __init__(self, out: BinaryIO | None = None):
        self.out = out or sys.stdout.buffer
        self.lines = Lines()
        self.status: dict[str, int] = {}
        self.lost: dict[str, str] = {}
        self.late: dict[str, str] = {}  # node -> "start" (-t) or "run" (-u)
        self._planned: list[str] = []
        self._unreachable: list[str] = []

    # ------------------------------------------------------------ the plan (set by the client)

    @property
    def planned(self) -> list[str]:
        return self._planned

    @planned.setter
    def planned(self, nodes: list[str]) -> None:
        self._planned = list(nodes)
        self._emit("plan", nodes=self._planned)

    @property
    def unreachable(self) -> list[str]:
        return self._unreachable

    @unreachable.setter
    def unreachable(self, what: list[str]) -> None:
        self._unreachable = list(what)
        for item in self._unreachable:
            self._emit("unreachable", what=item)

    # ------------------------------------------------------------ as frames arrive

    def output(self, node: str, fd: int, data: bytes) -> None:
        out = bytearray()
        self.lines.feed(node, fd, data, self._pieces(out, node, fd))
        self._write(out)

    def exited(self, node: str, status: int) -> None:
        self._flush_node(node)
        self.status[node] = status
        self._emit("exit", node=node, status=status)

    def node_lost(self, nodes: list[str], reason: str) -> None:
        new = [n for n in nodes if n not in self.lost]
        for node in new:
            self._flush_node(node)
            self.lost[node] = reason
        if new:
            self._emit("lost", nodes=new, reason=reason)

    def timed_out(self, nodes: list[str], phase: str) -> None:
        new = [n for n in nodes if n not in self.late]
        for node in new:
            self.late[node] = phase
        if new:
            self._emit("timeout", nodes=new, phase=phase)

    # ------------------------------------------------------------ at the end

    def finish(self) -> int:
        """Emit what is left and the summary; return the exit status of the whole job."""
        for node in self.lines.nodes():
            self._flush_node(node)
        self.node_lost(unreported(self.planned, self.status, self.lost), NO_REPORT)
        status = job_status(self.status, self.lost, self.unreachable, self.late)
        self._emit("summary", status=status, **self._outcomes())
        return status

    def _outcomes(self) -> dict[str, Any]:
        """Nodes by outcome, each node in one: lost (even if it exited first), ok or failed."""
        ok: list[str] = []
        failed: dict[int, list[str]] = {}
        for node, status in self.status.items():
            if node not in self.lost:
                (failed.setdefault(status, []) if status else ok).append(node)
        lost: dict[str, list[str]] = {}
        for node, reason in self.lost.items():
            lost.setdefault(reason, []).append(node)
        return {
            "counts": {
                "planned": len(self.planned),
                "ok": len(ok),
                "failed": sum(map(len, failed.values())),
                "lost": len(self.lost),
                "unreachable": len(self.unreachable),
                "timed_out": len(self.late),
            },
            "ok": sorted(ok, key=natural),
            "failed": [
                {"status": s, "nodes": sorted(n, key=natural)} for s, n in sorted(failed.items())
            ],
            "lost": [{"reason": r, "nodes": sorted(n, key=natural)} for r, n in lost.items()],
            "unreachable": list(self.unreachable),
            "timed_out": [
                {
                    "phase": p,
                    "nodes": sorted((n for n, q in self.late.items() if q == p), key=natural),
                }
                for p in ("start", "run")
                if p in self.late.values()
            ],
        }

    # ------------------------------------------------------------ writing

    def _pieces(self, out: bytearray, node: str, fd: int):  # noqa: ANN202 - a Piece
        stream = STREAMS.get(fd, str(fd))

        def piece(line: Chunk, cont: bool, newline: bool) -> None:
            data = bytes(line)
            try:
                body: dict[str, Any] = {"text": data.decode()}
            except UnicodeDecodeError:
                body = {"base64": base64.b64encode(data).decode()}
            out.extend(
                encode("output", node=node, stream=stream, **body, cont=cont, newline=newline)
            )

        return piece

    def _flush_node(self, node: str) -> None:
        """Emit what a node left without a final newline (``"newline": false``)."""
        out = bytearray()
        for fd in (1, 2):
            self.lines.flush(node, fd, self._pieces(out, node, fd))
        self._write(out)

    def _emit(self, event: str, **fields: Any) -> None:
        self._write(encode(event, **fields))

    def _write(self, data: bytes | bytearray) -> None:
        if data:
            self.out.write(data)
            self.out.flush()


def encode(event: str, **fields: Any) -> bytes:
    """One event as a line of compact JSON, in ASCII: anything else is escaped (``\\u00e9``),
    so no reader's line splitting (U+2028, U+0085) or locale can break a line."""
    obj = {"v": VERSION, "event": event, **fields}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
