"""Starting a job's program on a node, optionally in a private mount namespace.

A job is forked by the launcher (gproc.spawner), a lean process the slave starts once and
talks to over a Unix socket, so a job costs a fork of a small interpreter instead of one of
the whole daemon, or with ``-launcher=false`` by the slave itself. Either way the private
mount is set up in the child between fork and exec (gproc.spawner.child_setup): a new mount
namespace (plus a user namespace when not root), every mount made private so nothing
propagates back, and the job's staging directory bind-mounted over binRoot. When the last
process of the job exits the namespace and its mount are gone with it; the daemon then
removes the staging directory, so nothing of the job is left on the node.

Every job process asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``; the
launcher asks the same of the slave) and leads its own session, so the daemon can kill the
whole process group on cancel.
"""

from __future__ import annotations

import array
import asyncio
import importlib.util
import itertools
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from gproc import spawner
from gproc.errors import GprocError
from gproc.users import RunAs

log = logging.getLogger("gproc.sandbox")


class SandboxError(GprocError):
    """The private mount cannot be made here; the message suggests -p=false."""


@dataclass(frozen=True)
class Launch:
    """What to exec and where: the program's argv, environment and working directory."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    bind: tuple[str, str] | None = None  # (staging dir, binRoot) for a private mount
    lower: str | None = None  # a shared tree (gproc.trees): bind is then an overlay's upper
    work: str | None = None  # the overlay's work directory, beside the upper one
    user: RunAs | None = None  # drop to this user after the mount (the daemon is root)
    stdin: bool = False  # a pipe for the client's standard input, else /dev/null


def _user(launch: Launch) -> tuple[int, int, list[int]] | None:
    u = launch.user
    return (u.uid, u.gid, list(u.groups)) if u is not None else None


def _child_setup(launch: Launch, daemon: int) -> None:
    spawner.child_setup(launch.bind, launch.lower, launch.work, _user(launch), launch.cwd, daemon)


def _setup_failed(launch: Launch, why: object) -> SandboxError | OSError:
    """What to say when the child could not make the private mount or become the user."""
    if launch.user is not None and launch.bind is None:
        return SandboxError(f"cannot run as {launch.user.name}: {why}")
    if launch.bind is not None:
        return SandboxError(
            f"cannot set up the private mount over {launch.bind[1]} ({why}); "
            "run as root, allow user namespaces, or pass -p=false"
        )
    return OSError(f"cannot start {launch.argv[0]}: {why}")


async def start(launch: Launch) -> asyncio.subprocess.Process:
    """The slave itself forks and execs the program (``-launcher=false``); as Launcher.start."""
    daemon = os.getpid()  # the child's parent, which it checks is still there
    try:
        return await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=subprocess.PIPE if launch.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=launch.env,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(launch, daemon),
        )
    except subprocess.SubprocessError as e:
        raise _setup_failed(launch, e) from None


def kill_group(proc: asyncio.subprocess.Process | JobProcess, force: bool = False) -> None:
    """SIGKILL the job's whole process group (it leads its own session).

    ``force`` also after the leader has exited: what it started in the background lives
    on in its group, and a job leaves nothing behind.
    """
    if proc.returncode is None or force:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def exit_status(returncode: int) -> int:
    """The shell's convention: 128+signal for a signal, else the exit code."""
    return 128 - returncode if returncode < 0 else returncode


class JobProcess:
    """A job the launcher forked: what the slave uses of asyncio's Process, and no more."""

    def __init__(self) -> None:
        self.pid = 0  # until the launcher says it started
        self.returncode: int | None = None
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def exited(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set_result(returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class Launcher:
    """The slave's end of the launcher (gproc.spawner): starts it, hands it jobs, hears back.

    It is started with the daemon, off any job's path, and again after it died (every job it
    had then is reported killed: the parent-death signal took them). Use it from the event
    loop's thread only: the launcher's parent-death signal follows the thread that started it.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox = bytearray()
        self._tags = itertools.count()
        self._starting: dict[int, tuple[asyncio.Future[None], JobProcess]] = {}
        self._jobs: dict[int, JobProcess] = {}
        self._sending = asyncio.Lock()

    def ensure(self) -> None:
        """Start the launcher unless it runs."""
        if self._sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            # The program comes on standard input, so ps shows a short, named command line.
            argv = [sys.executable, "-I", "-S", "-", spawner.NAME, str(theirs.fileno())]
            self._proc = subprocess.Popen(
                [*argv, str(os.getpid())], pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE
            )
            assert self._proc.stdin is not None
            with self._proc.stdin:
                self._proc.stdin.write(_SOURCE)  # a few KiB: within a pipe's buffer
        ours.setblocking(False)
        self._sock = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)
        log.debug("launcher %d started", self._proc.pid)

    async def start(self, launch: Launch) -> JobProcess:
        """Fork and exec the program with pipes for its output; raises OSError or SandboxError."""
        self.ensure()
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if launch.stdin else (os.open(os.devnull, os.O_RDONLY), -1)
        ours = [out_r, err_r] + ([in_w] if in_w >= 0 else [])
        tag, job = next(self._tags), JobProcess()
        started: asyncio.Future[None] = loop.create_future()
        self._starting[tag] = (started, job)
        request = ("run", tag, launch.argv, launch.env, launch.cwd, launch.bind, launch.lower)
        request += (launch.work, _user(launch))
        try:
            try:
                await self._send(marshal.dumps(request), [in_r, out_w, err_w])
            finally:
                for fd in (in_r, out_w, err_w):  # the launcher holds its own copies now
                    os.close(fd)
            await started
        except BaseException as e:
            self._starting.pop(tag, None)
            for fd in ours:
                os.close(fd)
            if isinstance(e, _SetupFailed):
                raise _setup_failed(launch, e) from None
            raise
        # together: on a daemon whose other threads hold the GIL (a job unpacking), every
        # turn of the loop costs a wait for it
        job.stdout, job.stderr = await asyncio.gather(_reader(loop, out_r), _reader(loop, err_r))
        if in_w >= 0:
            job.stdin = await _writer(loop, in_w)
        return job

    async def _send(self, body: bytes, fds: list[int]) -> None:
        """One request, its descriptors riding with its first byte."""
        data = spawner.LENGTH.pack(len(body)) + body
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        loop = asyncio.get_running_loop()
        async with self._sending:
            while True:
                if self._sock is None:
                    raise SandboxError("the launcher is gone; the slave is stopping")
                try:
                    sent = self._sock.sendmsg([data], rights)
                    break
                except (BlockingIOError, InterruptedError):
                    await _writable(loop, self._sock)
            if sent < len(data):
                await loop.sock_sendall(self._sock, data[sent:])

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._inbox += data
        size = spawner.LENGTH.size
        while len(self._inbox) >= size:
            (length,) = spawner.LENGTH.unpack_from(self._inbox)
            if len(self._inbox) < size + length:
                break
            answer = marshal.loads(bytes(self._inbox[size : size + length]))
            del self._inbox[: size + length]
            self._answer(answer)

    def _answer(self, answer: tuple) -> None:
        kind = answer[0]
        if kind == "exit":
            job = self._jobs.pop(answer[1], None)
            if job is not None:
                job.exited(os.waitstatus_to_exitcode(answer[2]))
            return
        entry = self._starting.pop(answer[1], None)
        if entry is None:
            return
        started, job = entry
        if kind == "started":
            job.pid = answer[2]
            self._jobs[job.pid] = job
            if not started.done():
                started.set_result(None)
        elif not started.done():
            _, _, step, code, text = answer
            started.set_exception(_failure(step, code, text))

    def _lost(self) -> None:
        """The launcher died: its jobs died with it (parent-death signal)."""
        log.warning("the job launcher exited; starting another for the next job")
        proc = self._proc
        self.close()
        if proc is not None:
            asyncio.get_running_loop().run_in_executor(None, proc.wait)  # no zombie left
        for started, _ in self._starting.values():
            if not started.done():
                started.set_exception(SandboxError("the job launcher exited while starting"))
        for job in self._jobs.values():
            job.exited(-signal.SIGKILL)
        self._starting.clear()
        self._jobs.clear()

    def close(self) -> None:
        """Stop the launcher; it kills the jobs that still run."""
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        self._proc = None  # it exits on the closed socket, or with this daemon


class _SetupFailed(Exception):
    """The child could not make the private mount or become the user (the launcher's word)."""


def _failure(step: str, code: int, text: str) -> Exception:
    if step == "setup":
        return _SetupFailed(text)
    return OSError(code, text)  # FileNotFoundError for ENOENT, as subprocess gives


async def _reader(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 16, loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(fd, "rb", 0)
    )
    return reader


async def _writer(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.StreamWriter:
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop)
    transport, _ = await loop.connect_write_pipe(lambda: protocol, os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def _source() -> str:
    """gproc.spawner's text, from a checkout, an install or the zipapp alike."""
    spec = importlib.util.find_spec("gproc.spawner")
    source = spec.loader.get_source("gproc.spawner") if spec and spec.loader else None  # type: ignore[attr-defined]
    if not source:
        raise GprocError("cannot read gproc.spawner's source to start the job launcher")
    return source


_SOURCE = _source().encode()
