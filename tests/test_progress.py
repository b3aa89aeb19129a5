"""Progress bars: on a terminal (a pseudo-terminal here) a bar, read as a person would see it;
anywhere else nothing, not a stray carriage return."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from conftest import Tree, labelled

from gproc.deploy.ssh import FAILED, OK, UNREACHABLE, Progress, Result
from gproc.output import Printer
from gproc.progress import ExecProgress

ALL = [f"n{i}" for i in range(1, 9)]


class Terminal:
    """A pseudo-terminal 120 columns wide, and what was written to it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.written = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: every writer closed its end
                return
            if not data:
                return
            self.written += data

    def text(self) -> io.TextIOWrapper:
        """A text stream on the terminal, as sys.stderr would be."""
        return io.TextIOWrapper(os.fdopen(os.dup(self.slave), "wb"), write_through=True)

    def binary(self) -> io.BufferedWriter:
        return os.fdopen(os.dup(self.slave), "wb")

    def close(self) -> None:
        """Close our end; once every writer has closed its own, the screen is complete."""
        os.close(self.slave)
        self._reader.join(30)
        assert not self._reader.is_alive(), "something still holds the terminal open"
        os.close(self.master)

    def screen(self) -> list[str]:
        """The lines a person sees: a carriage return goes back to the line's start, and what
        follows overwrites what was there."""
        lines: list[str] = []
        line: list[str] = []
        col = 0
        for ch in self.written.decode(errors="replace"):
            if ch == "\n":
                lines.append("".join(line).rstrip())
                line, col = [], 0
            elif ch == "\r":
                col = 0
            else:
                if col < len(line):
                    line[col] = ch
                else:
                    line.append(ch)
                col += 1
        if "".join(line).strip():
            lines.append("".join(line).rstrip())
        return lines


# ---------------------------------------------------------------- the bars alone


def test_exec_bar_keeps_output_lines_whole_and_ends_at_100_percent() -> None:
    term = Terminal()
    err, out = term.text(), term.binary()
    progress = ExecProgress(err, threshold=1 << 20)
    printer = progress.around(Printer(out=out, err=out))
    printer.planned = ["n1", "n2"]
    progress.sending(8 << 20)
    for i in range(64):
        progress.sent(128 << 10)
        if i == 20:
            printer.output("n1", 1, b"hello from n1\n")
    printer.output("n2", 2, b"a warning\nno newline")
    printer.exited("n1", 0)
    printer.exited("n2", 0)
    assert printer.finish() == 0
    err.close()
    out.close()
    term.close()
    screen = [line for line in term.screen() if line]
    assert "n1: hello from n1" in screen
    assert "n2: a warning" in screen
    assert "n2: no newline" in screen
    assert not [line for line in screen if "n1:" in line or "n2:" in line if "%|" in line]
    last = screen[-1]
    assert last.startswith("gproc e: 100%|"), screen
    assert "8.00M/8.00M" in last and "2/2 nodes done" in last


def test_exec_bar_is_not_drawn_for_a_small_send() -> None:
    term = Terminal()
    err, out = term.text(), term.binary()
    progress = ExecProgress(err)  # the real threshold, 4 MiB
    printer = progress.around(Printer(out=out, err=out))
    printer.planned = ["n1"]
    progress.sending(4 << 20)
    progress.sent(4 << 20)
    printer.output("n1", 1, b"done\n")
    printer.exited("n1", 0)
    printer.finish()
    err.close()
    out.close()
    term.close()
    assert term.screen() == ["n1: done"]


def test_no_terminal_no_bar() -> None:
    err = io.StringIO()
    progress = ExecProgress(err, threshold=0)
    printer = Printer(out=io.BytesIO(), err=io.BytesIO())
    assert progress.around(printer) is printer
    progress.sending(100 << 20)
    progress.sent(100 << 20)
    progress.close()
    assert err.getvalue() == ""


def test_deploy_progress_on_a_terminal_is_a_bar_of_hosts_done() -> None:
    term = Terminal()
    err = term.text()
    progress = Progress("copy", 3, out=err)
    for state in (OK, UNREACHABLE, OK):
        progress.tick(Result(state, ""))
    err.close()
    term.close()
    last = [line for line in term.screen() if line][-1]
    assert last.startswith("copy: 100%|"), term.screen()
    assert "3/3" in last and "2 ok, 1 unreachable" in last


def test_deploy_progress_in_a_log_is_a_line_every_ten_hosts() -> None:
    log = io.StringIO()
    progress = Progress("start level 1", 25, out=log)
    for i in range(25):
        progress.tick(Result(FAILED if i == 24 else OK, ""))
    assert log.getvalue() == (
        "start level 1: 10/25 (10 ok)\n"
        "start level 1: 20/25 (20 ok)\n"
        "start level 1: 25/25 (1 failed, 24 ok)\n"
    )


# ---------------------------------------------------------------- gproc e on a real tree


def big_file(tree: Tree, name: str, size: int) -> Path:
    """``size`` random bytes: no node's cache holds them, so all of them are sent."""
    path = tree.root / name
    path.write_bytes(os.urandom(size))
    return path


def run(tree: Tree, *args: str, stderr: int | None = None) -> subprocess.CompletedProcess:
    """gproc with bytes out, as they are (text mode would turn a carriage return into a newline)."""
    return subprocess.run(
        [sys.executable, "-m", "gproc", *tree.switches(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        cwd=tree.root,
        timeout=120,
    )


SUM = 'sha256sum "$1"; echo done >&2'


def test_a_large_send_into_a_pipe_draws_no_bar(tree: Tree) -> None:
    path = big_file(tree, "big-pipe", 8 << 20)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    r = run(tree, "-f", str(path), "e", "./.", "/bin/sh", "-c", SUM, "sh", str(path))
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout.decode()) == {n: [f"{digest}  {path}"] for n in ALL}
    assert b"\r" not in r.stderr and b"\x1b" not in r.stderr and b"%|" not in r.stderr
    assert sorted(r.stderr.decode().splitlines()) == [f"{n}: done" for n in ALL]


def test_a_large_send_on_a_terminal_shows_the_bar_to_100_percent(tree: Tree) -> None:
    path = big_file(tree, "big-tty", 16 << 20)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # /bin/sh's files cached on every node first, whichever tests ran on this tree before, so
    # the bar's total is the file alone
    assert run(tree, "e", "./.", "/bin/sh", "-c", "true").returncode == 0
    term = Terminal()
    r = run(
        tree, "-f", str(path), "e", "./.", "/bin/sh", "-c", SUM, "sh", str(path), stderr=term.slave
    )
    term.close()
    assert r.returncode == 0, term.screen()
    # stdout is what it is without a terminal: the bar is on stderr alone
    assert labelled(r.stdout.decode()) == {n: [f"{digest}  {path}"] for n in ALL}
    screen = [line for line in term.screen() if line]
    assert sorted(line for line in screen if not line.startswith("gproc e:")) == [
        f"{n}: done" for n in ALL
    ], screen
    last = screen[-1]
    assert last.startswith("gproc e: 100%|"), screen
    assert "8/8 nodes done" in last
    assert "16.0M/16.0M" in last


@pytest.mark.parametrize("switch", ["-json", "-raw"])
def test_json_and_raw_draw_no_bar_even_on_a_terminal(tree: Tree, switch: str) -> None:
    path = big_file(tree, f"big{switch}", 6 << 20)
    term = Terminal()
    r = run(tree, "-f", str(path), "e", switch, "1", "/bin/echo", "hi", stderr=term.slave)
    term.close()
    assert r.returncode == 0, term.screen()
    assert term.written == b""
    assert r.stdout.endswith(b"\n")
