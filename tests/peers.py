"""What the attack tests share: waiting on events, a daemon's memory, raw frames, a fresh
slave daemon whose parent port the test owns, and a relay the test can make misbehave.

Nothing here imitates the daemons under test: the fresh slave is ``python -m gproc s``, and
the relay only moves bytes between two real daemons (and injects, drops or reorders frames
when a test tells it to).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from conftest import Tree, free_port_block

from gproc.protocol import LENGTH, MAC, Frame, JobHeader, decode, encode
from gproc.session import Secrets, Session
from gproc.stream import Conn
from gproc.wire import Incomplete
from harness.waiting import wait_until as wait_until  # re-exported for the attack tests

T = TypeVar("T")


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            out[name] = int(value.split()[0])
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_of(tree: Tree, name: str) -> str:
    return (tree.root / "state" / f"{name}.log").read_text(errors="replace")


def answers_all(tree: Tree, nodes: int = 8) -> None:
    """The tree runs a job on every node (exit 0) and ``gproc i`` shows them all up."""
    r = tree.gproc("e", "./.", "/bin/true", timeout=60)
    assert r.returncode == 0, r.stderr
    info = tree.gproc("i")
    assert info.returncode == 0, info.stderr
    assert info.stdout.rstrip().endswith(f"{nodes} nodes below master: {nodes} up, 0 lost"), (
        info.stdout
    )


def local_job(argv: list[str], job: str = "a11ce") -> JobHeader:
    """A job header as a parent would send it: run the node's own ``argv``, no files."""
    me = pwd.getpwuid(os.geteuid())
    return JobHeader(job, "", argv, {"PATH": "/usr/bin:/bin"}, "/", "local", "", "", [], False,
                     False, [], 0, me.pw_name, me.pw_uid, me.pw_gid)  # fmt: skip


def sealed_with_guess(frame: Frame, dialer_hello: bytes, acceptor_hello: bytes, seq: int = 0,
                      to_acceptor: bool = False) -> bytes:  # fmt: skip
    """``frame`` sealed as an attacker can: the session derivation run on everything it saw
    (both hellos, both nonces) with the one thing it lacks, the key, guessed."""
    d_nonce, a_nonce = decode(dialer_hello).nonce, decode(acceptor_hello).nonce  # type: ignore[attr-defined]
    derived = Secrets(os.urandom(32), dialer_hello, acceptor_hello, d_nonce + a_nonce)
    key = derived.dialer_to_acceptor if to_acceptor else derived.acceptor_to_dialer
    session = Session(key, key)
    session.sent = seq
    return session.seal(encode(frame))


def unsealed(frame: Frame) -> bytes:
    """A frame as it would travel without a session, 32 made-up bytes in place of the MAC."""
    body = encode(frame) + os.urandom(MAC)
    return LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole frame (length prefix included), exactly as it came."""
    head = await reader.readexactly(4)
    (size,) = LENGTH.unpack(head)
    return head + await reader.readexactly(size)


class Frames:
    """A plain asyncio StreamReader read as gproc.stream.Conn reads a FrameReader, so a test
    can read raw frames off a connection and then speak gproc on the same one."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader

    async def next(self, check: Callable[[int], None]) -> tuple[bytes, bytes]:
        try:
            head = await self.reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            raise Incomplete(len(e.partial)) from None
        (size,) = LENGTH.unpack(head)
        check(size)
        try:
            return head, await self.reader.readexactly(size)
        except asyncio.IncompleteReadError as e:
            raise Incomplete(4 + len(e.partial)) from None


def conn_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **kw: Any) -> Conn:
    """A Conn over asyncio's own streams (see Frames)."""
    return Conn(Frames(reader), writer, **kw)  # type: ignore[arg-type]


def body_of(frame: bytes, sealed: bool) -> Frame | None:
    """What a captured frame says (sessions give no confidentiality), None if undecodable."""
    body = frame[4 : len(frame) - MAC] if sealed else frame[4:]
    try:
        return decode(body)
    except Exception:
        return None


class FreshSlave:
    """A real ``gproc s`` with the tree's key whose parent port is ``parent_port``.

    With the local locale, node ``number`` with rack size ``number`` hangs under the master
    (as id 1) at -cmdport, so the test decides where the slave dials: a fake parent, or a
    relay in front of a real daemon. Ids other than 1 are made with ``racksize=1``: node N
    is then id N under the master.
    """

    def __init__(self, tree: Tree, parent_port: int, number: int, workdir: Path,
                 heartbeat: float = 5.0):  # fmt: skip
        self.number = number
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"slave-{parent_port}-{number}.log"
        argv = [
            sys.executable, "-m", "gproc", "-locale", "local", "-cmdport", str(parent_port),
            "-myId", str(number), "-racksize", "1", "-key", tree.launcher.settings.key or "",
            "-binRoot", str(workdir / "xproc"), "-debug", "1", "-heartbeat", str(heartbeat), "s",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    @property
    def name(self) -> str:
        return f"n{self.number}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float, what: str) -> int:
        wait_until(lambda: self.proc.poll() is not None, timeout, what)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spare_port() -> int:
    """A loopback port nobody listens on, with room above it for a fresh slave's own port."""
    return free_port_block(64)


class Relay:
    """A man in the middle on loopback: forwards every byte between a daemon that dials
    ``listen`` and the daemon at ``target``, in a thread of its own, and records each frame.

    ``down`` is target to dialer (parent to child), ``up`` the other way. The first two
    frames each way are the hello and the proof; every later one is sealed. A test can
    inject bytes, or set ``tamper[direction]`` to a function that receives each later frame
    and returns the list of frames to send in its place (empty: drop; two: reorder...).
    """

    def __init__(self, listen: int, target: int):
        self.listen = listen
        self.target = target
        self.frames: dict[str, list[bytes]] = {"down": [], "up": []}
        self.tamper: dict[str, Callable[[bytes], list[bytes]] | None] = {"down": None, "up": None}
        self.writers: dict[str, asyncio.StreamWriter] = {}
        self.sessions = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.listen)
        )
        self.ready.set()
        self.loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        self.frames = {"down": [], "up": []}
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers = {"down": writer, "up": up_writer}
        await asyncio.gather(
            self._pump(reader, up_writer, "up"),
            self._pump(up_reader, writer, "down"),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:  # fmt: skip
        try:
            while True:
                frame = await read_frame(reader)
                self.frames[direction].append(frame)
                tamper = self.tamper[direction]
                out = (
                    [frame] if tamper is None or len(self.frames[direction]) <= 2 else tamper(frame)
                )
                for f in out:
                    writer.write(f)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            other = self.writers.get("down" if direction == "up" else "up")
            if other is not None:
                other.close()
            writer.close()

    def inject(self, direction: str, data: bytes) -> None:
        """Write ``data`` towards the child (``down``) or the parent (``up``) of the session."""

        def write() -> None:
            self.writers[direction].write(data)

        self.loop.call_soon_threadsafe(write)

    def hellos(self) -> tuple[bytes, bytes]:
        """The bodies of the dialer's and the acceptor's hello of the current session."""
        return self.frames["up"][0][4:], self.frames["down"][0][4:]

    def sealed(self, direction: str) -> list[tuple[bytes, Any]]:
        """Every sealed frame seen so far in ``direction``, with what it says."""
        return [(f, body_of(f, True)) for f in self.frames[direction][2:]]

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for w in self.writers.values():
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(10)
        self.loop.close()
