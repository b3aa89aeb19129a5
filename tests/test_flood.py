"""Floods by peers that never authenticate: msgpack bombs and a full fd table.

What a user would notice is memory and a log that fills the disk, and whether the next job
runs: a daemon hit by 100 concurrent 4 MiB bombs stays under MEMORY_BOUND of peak resident
memory, and a daemon whose fd table is filled by a connection flood logs a few lines a
second at most and runs the next job once the flood is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from conftest import Tree
from peers import FreshSlave, answers_all, memory_kib, open_fds, spare_port, wait_until

from gproc.client import fetch_tree, tree_rows
from gproc.protocol import LENGTH

MEMORY_BOUND = 100 << 10  # KiB of peak resident memory (VmHWM) a daemon may reach
BOMBS = 100
BOMB_BODY = 4 << 20
# a length header of 4 MiB, then an array of 4M empty maps: a few bytes each on the wire,
# a few dozen each once decoded
BOMB = (
    LENGTH.pack(BOMB_BODY) + b"\xdd" + struct.pack(">I", BOMB_BODY - 5) + b"\x80" * (BOMB_BODY - 5)
)
# the same shape small enough to pass the pre-authentication cap, declaring 4M items
SMALL_BOMB = b"\xdd" + struct.pack(">I", 4 << 20) + b"\x80" * 1000
SMALL_BOMB = LENGTH.pack(len(SMALL_BOMB)) + SMALL_BOMB


async def _bomb(port: int, payload: bytes) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 30)
    except (OSError, asyncio.TimeoutError):
        pass  # closed on us mid-send: the daemon refused the bomb
    finally:
        writer.close()


async def _barrage(port: int) -> None:
    """BOMBS connections at once, each sending a 4 MiB bomb; then as many small ones."""
    for payload in (BOMB, SMALL_BOMB):
        await asyncio.gather(*(_bomb(port, payload) for _ in range(BOMBS)))


def test_msgpack_bombs_cost_no_memory(tree: Tree, record_property) -> None:  # noqa: ANN001
    targets = {"master": tree.launcher.settings.cmdport, "n4": tree.launcher.settings.cmdport + 4}
    before = {name: memory_kib(tree.pid(name))["VmHWM"] for name in targets}
    start = time.monotonic()
    for port in targets.values():
        asyncio.run(_barrage(port))
    took = time.monotonic() - start
    peaks = {name: memory_kib(tree.pid(name))["VmHWM"] for name in targets}
    print(
        f"{BOMBS} bombs of {BOMB_BODY >> 20} MiB at each of {list(targets)} in {took:.1f}s: "
        f"peak RSS KiB before {before}, after {peaks}"
    )
    record_property("peak_kib", peaks)
    for name, peak in peaks.items():
        assert peak < MEMORY_BOUND, f"{name} peaked at {peak} KiB"
    answers_all(tree)


# ---------------------------------------------------------------- running out of fds

FD_LIMIT = 48  # below the daemon's own few plus its 64 connections in a handshake
FLOOD_SECONDS = 8.0  # longer than the handshake timeout, so refused peers come and go


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_fd_flood_is_survived_quietly(tree: Tree, tmp_path: Path, record_property) -> None:  # noqa: ANN001
    """A master limited to FD_LIMIT fds, with one slave, is flooded with connections that
    never say hello until it runs out of fds; held, then released."""
    port = spare_port()
    uds = str(tmp_path / "flood.sock")
    log_path = tmp_path / "master.log"
    key = tree.launcher.settings.key or ""
    argv = [
        sys.executable, "-m", "gproc", "-locale", "local", "-cmdport", str(port),
        "-defaultMasterUDS", uds, "-key", key, "-binRoot", str(tmp_path / "xproc"),
        "-debug", "1", "-heartbeat", "1", "m",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        master = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_low_fd_limit
        )
    slave = FreshSlave(tree, port, 1, tmp_path, heartbeat=1.0)
    held: list[socket.socket] = []
    try:
        wait_until(lambda: _states(uds) == ["up"], 30, "the slave to register")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
        lines_before = _lines(log_path)
        start = time.monotonic()
        peak_fds = 0
        while time.monotonic() - start < FLOOD_SECONDS:
            for _ in range(20):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError, OSError):
                    s.connect(("127.0.0.1", port))
                held.append(s)
            peak_fds = max(peak_fds, open_fds(master.pid))
            time.sleep(0.1)
        flood_lines = _lines(log_path) - lines_before
        full = "Too many open files" in log_path.read_text()
        for s in held:
            s.close()
        held.clear()
        rate = flood_lines / FLOOD_SECONDS
        print(
            f"fd flood: master with {FD_LIMIT} fds, {peak_fds} open at the peak, out of fds: "
            f"{full}; {flood_lines} log lines in {FLOOD_SECONDS:.0f}s ({rate:.1f}/s)"
        )
        record_property("log_lines_per_second", rate)
        assert full and peak_fds >= FD_LIMIT - 1, "the flood never filled the fd table"
        assert rate <= 3, log_path.read_text()[-3000:]
        assert master.poll() is None, "the master died"
        r = wait_until(lambda: _echo(port, uds, key), 30, "the next job to run")
        assert r.stdout == "n1: ok\n", r
        text = log_path.read_text()
        assert "Traceback" not in text, text[-3000:]
    finally:
        for s in held:
            s.close()
        slave.stop()
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()


def _states(uds: str) -> list[str]:
    try:
        return [row[4] for row in tree_rows(fetch_tree(uds))[1:]]
    except Exception:
        return []


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def _echo(port: int, uds: str, key: str) -> subprocess.CompletedProcess | None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gproc",
            "-cmdport",
            str(port),
            "-defaultMasterUDS",
            uds,
            "-key",
            key,
            "e",
            ".",
            "/bin/echo",
            "ok",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(uds),
    )
    return r if r.returncode == 0 else None
