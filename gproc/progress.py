"""Progress bars for the long steps a person waits on: a large send by ``gproc e``, the hosts
of each ``gproc-deploy`` phase.

A bar is drawn (by tqdm, not by escape codes of our own) only on a stream that is a terminal:
in a pipe, a file or a CI log a line rewritten with ``\\r`` is noise, so there is none at all.
tqdm is imported only when a bar is drawn: the zipapp the nodes run does not carry it, and a
front-end without it shows no bar and works as before.

``gproc e`` keeps printing the job's output while its bar is up, from another thread than
the one sending; :meth:`Bar.aside` clears the bar for each write and draws it again below,
so a line of output never lands in the middle of the bar.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from gproc.output import Printer

P = TypeVar("P")

# gproc e shows a bar when the files the nodes lack come to more than this.
THRESHOLD = 4 << 20


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Bar:
    """One bar on ``stream`` when it is a terminal and tqdm is there; otherwise every method
    does nothing. Safe to use from several threads."""

    def __init__(self, desc: str, total: int, stream: TextIO, **tqdm_args: Any):
        self.lock = threading.RLock()
        self._bar: Any = None
        if not is_terminal(stream):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        # miniters=1: redraws are limited by time alone (tqdm's mininterval), and tqdm's
        # monitor thread never redraws behind our lock
        self._bar = tqdm(desc=desc, total=total, file=stream, leave=True, miniters=1, **tqdm_args)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def advance(self, n: int = 1, note: str | None = None) -> None:
        with self.lock:
            if self._bar is not None:
                if note is not None:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.update(n)

    def note(self, text: str) -> None:
        """Set the text after the counts (``3/8 nodes done``) and redraw."""
        with self.lock:
            if self._bar is not None:
                self._bar.set_postfix_str(text)

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Clear the bar while something else is written to the terminal, then draw it again."""
        with self.lock:
            if self._bar is None:
                yield
                return
            self._bar.clear()
            try:
                yield
            finally:
                self._bar.refresh()

    def close(self) -> None:
        """Draw the bar a last time and leave it on its own line."""
        with self.lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


class ExecProgress:
    """``gproc e``'s bar: bytes sent of what the nodes lack, and nodes done of planned.

    It is drawn only when ``stream`` is a terminal and the send exceeds :data:`THRESHOLD`;
    it stays until the job ends, counting exits. The client turns it off (``stream=None``)
    for ``-json`` and ``-raw``, whose output is for programs.
    """

    def __init__(self, stream: TextIO | None, threshold: int = THRESHOLD):
        self.stream = stream if is_terminal(stream) else None
        self.threshold = threshold
        self.planned = 0
        self.done = 0
        self.bar: Bar | None = None

    @property
    def on(self) -> bool:
        return self.stream is not None

    def around(self, printer: P) -> P:
        """``printer`` itself, or when a bar may be drawn, a printer that keeps out of its way
        and counts the nodes done."""
        return _BarPrinter(printer, self) if self.on else printer  # type: ignore[return-value]

    def sending(self, total: int) -> None:
        """The nodes lack ``total`` bytes; from the thread that reads the master."""
        if self.stream is not None and total > self.threshold and self.bar is None:
            self.bar = Bar(
                "gproc e",
                total,
                self.stream,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                dynamic_ncols=True,
            )
            self.bar.note(self._nodes())

    def sent(self, size: int) -> None:
        """``size`` more bytes went out; from the sending thread."""
        if self.bar is not None:
            self.bar.advance(size)

    def node_done(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.note(self._nodes())

    def aside(self) -> contextlib.AbstractContextManager[None]:
        return self.bar.aside() if self.bar is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _nodes(self) -> str:
        return f"{self.done}/{self.planned} nodes done"


class _BarPrinter:
    """A printer (``gproc.output.Printer``'s interface) whose writes make room for the bar.

    An event it does not know yet goes straight to the printer it wraps (``__getattr__``):
    it still works, it only writes over the bar if a bar is up.
    """

    def __init__(self, printer: Printer, progress: ExecProgress):
        self._printer = printer
        self._progress = progress

    @property
    def planned(self) -> list[str]:
        return self._printer.planned

    @planned.setter
    def planned(self, nodes: list[str]) -> None:
        self._printer.planned = nodes
        self._progress.planned = len(nodes)

    @property
    def unreachable(self) -> list[str]:
        return self._printer.unreachable

    @unreachable.setter
    def unreachable(self, what: list[str]) -> None:
        self._printer.unreachable = what

    def output(self, node: str, fd: int, data: bytes) -> None:
        with self._progress.aside():
            self._printer.output(node, fd, data)

    def exited(self, node: str, status: int) -> None:
        with self._progress.aside():  # it may print what the node left without a newline
            self._printer.exited(node, status)
        self._progress.node_done()

    def node_lost(self, nodes: list[str], reason: str) -> None:
        with self._progress.aside():
            self._printer.node_lost(nodes, reason)

    def finish(self) -> int:
        self._progress.close()  # the summary goes below the bar's last state
        return self._printer.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._printer, name)
