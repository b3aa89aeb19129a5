"""The slave daemon (``gproc s``): registers with its parent, runs jobs, serves its children.

A slave is a relay hop (see gproc.relay) plus a local runner: when its parent selects it for a
job, the slave unpacks the job's files under a per-job staging directory (or straight into
binRoot with ``-p=false``) as the chunks pass through, forwards the same chunks to its own
selected children, then forks the program. As in the original gproc, a slave exits when its
parent goes away: its jobs are killed and its children, seeing it go, exit in turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from gproc import copying, diskwork, nodespec, pidfile, sandbox, trees, users, wire
from gproc.bundle import BundleError, Unpacker, check_manifest
from gproc.cache import BlobCache
from gproc.protocol import (
    BadJob,
    Bye,
    Credit,
    Data,
    Done,
    Exit,
    Frame,
    Input,
    JobHeader,
    Kill,
    Late,
    Need,
    Out,
    Ping,
    ProtocolError,
    Refused,
    Register,
    Signal,
    Subtree,
    Welcome,
)
from gproc.relay import DOWN_WINDOW, UP_WINDOW, Hop, Job, LocalRunner
from gproc.session import handshake
from gproc.stream import HEARTBEAT, Conn, Window, charge, keep_alive, within
from gproc.trees import SharedTree, TreeStore

log = logging.getLogger("gproc.slave")
T = TypeVar("T")

EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_KILLED = 128 + 9
EXIT_TIMEOUT = 124  # as timeout(1)
RETRY_SECONDS = 0.5


@dataclass(frozen=True)
class NodeConfig:
    """What a slave needs to run jobs: its name, binRoot, and the cache size (0: no cache).

    Staging (the per-job roots mounted over binRoot) and the cache of shipped files live
    beside binRoot, not in it, so nothing of them shows through binRoot.
    """

    name: str
    bin_root: str
    cache_bytes: int = 512 << 20
    launcher: bool = True  # fork jobs from a lean launcher process (gproc.spawner)
    in_memory: bool = False  # binRoot, staging, cache in RAM: small writes run at once

    @property
    def stage_root(self) -> str:
        return self.bin_root.rstrip("/") + ".stage"

    @property
    def cache_root(self) -> str:
        return self.bin_root.rstrip("/") + ".cache"


def program_argv(header: JobHeader, root: str) -> list[str]:
    """The argv to exec for a job whose files sit under ``root``.

    The default runs the shipped loader with the shipped library directories, so a node whose
    own libraries differ or are missing still runs the binary; ``env`` is the original's
    LD_LIBRARY_PATH way; ``local`` runs the node's own program; ``direct`` execs a shipped
    non-ELF file (a script) as it is.
    """
    argv, mode = list(header.argv), header.mode
    if mode == "local":
        return argv
    prog = root + header.prog
    if mode == "loader" and header.interp:
        dirs = ":".join(root + d for d in header.libdirs)
        extra = ["--argv0", argv[0]] if header.argv0 else []
        return [root + header.interp, "--library-path", dirs, *extra, prog, *argv[1:]]
    return [prog, *argv[1:]]


def placement(
    stage: str, header: JobHeader, switches: bool = False, move: bool = False
) -> list[str]:
    """gproc cp: this daemon's Python runs the placement program (gproc.copying) on the
    staged sources; ``argv`` is the destination, then the sources' absolute paths. ``move``:
    the staging is the job's own (private), so its files may be moved into place.

    The program runs as the job's user: when that is not the daemon's user and the daemon's
    Python is not for everyone (a virtualenv in root's home), the node's ``python3`` runs it
    (it needs only the standard library)."""
    python = sys.executable
    if switches and not _for_everyone(python):
        python = shutil.which("python3", path=users.DEFAULT_PATH) or python
    how = "move" if move else "copy"
    return [python, "-I", "-S", "-c", copying.PLACE, how, stage, *header.argv]


def _for_everyone(program: str) -> bool:
    """Whether any user may run ``program``: it and every directory on its way are o+x."""
    path = os.path.realpath(program)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def program_env(
    header: JobHeader, root: str, node: str, jid: str, user: users.RunAs | None = None
) -> dict[str, str]:
    """The shipped environment (``-export``), over what a login of the user would set."""
    env = user.env() if user is not None else {}
    env.update(header.env)
    env.update(GPROC_NODE=node, GPROC_JOB=jid)
    if header.mode == "env" and header.libdirs:
        env["LD_LIBRARY_PATH"] = ":".join(root + d for d in header.libdirs)
    return env


class NodeRun(LocalRunner):
    """This node's share of a job: unpack as chunks arrive, then run and report.

    Every step that touches the disk (checking the manifest, making the staging tree, copying
    cached files, writing chunks, removing the staging tree) runs in a worker thread, so the
    daemon keeps relaying and answering heartbeats while a large job unpacks; on a staging in
    memory, a small batch of chunks is written at once, where the thread costs more than the
    write (gproc.diskwork).

    A private job whose files are all cached (the same program run again) gets no copies: a
    shared tree of them (gproc.trees) is its overlay's lower layer, its empty staging
    directory the upper one.
    """

    def __init__(
        self,
        node: NodeConfig,
        header: JobHeader,
        problem: str | None = None,
        cache: BlobCache | None = None,
        shared: TreeStore | None = None,
        launcher: sandbox.Launcher | None = None,
    ):
        self.node = node
        self.launcher = launcher
        self.header = header
        self.jid = header.job
        self.job: Job | None = None
        self.proc: asyncio.subprocess.Process | sandbox.JobProcess | None = None
        self.error = problem
        self.killed = False
        self.task: asyncio.Task[None] | None = None
        self.private = header.private
        self.files_root = os.path.join(node.stage_root, self.jid) if self.private else node.bin_root
        self.cache = cache
        self.unpacker: Unpacker | None = None
        self.trees = shared
        self.shared: SharedTree | None = None  # the lower layer this job mounts, if any
        self.work = self.files_root + ".work"  # the overlay's work directory, beside staging
        self.prepared: asyncio.Task[frozenset[int]] | None = None
        self.needed: frozenset[int] = frozenset()
        self.writing: asyncio.Future[None] | None = None
        self.user: users.RunAs | None = None
        self.late: str | None = None  # "start" (-t) or "run" (-u) once a deadline has passed
        self.timers: list[asyncio.TimerHandle] = []
        self.launched = asyncio.Event()  # the program started, or never will
        self.stdin_open = header.stdin

    def attach(self, job: Job) -> None:
        """Start preparing the files (in a thread); launch once nothing more is needed.

        The job's deadlines (-t, -u) count from now, when the header reached this node.
        """
        self.job = job
        loop = asyncio.get_running_loop()
        self.prepared = loop.create_task(self._prepare())
        for ms, phase in ((self.header.start_ms, "start"), (self.header.run_ms, "run")):
            if ms:
                self.timers.append(loop.call_later(ms / 1000, self._deadline, phase))

    def _deadline(self, phase: str) -> None:
        """-t: give up if the program has not started; -u: kill it where it still runs."""
        if self.done or self.killed or self.late is not None:
            return
        if phase == "start" and self.task is not None:
            return  # started (or being started) in time
        self.late = phase
        if self.proc is not None:
            if self.proc.returncode is None:
                sandbox.kill_group(self.proc)  # _run reports the timeout
        elif self.task is None:
            self._launch()  # not started: _run gives up and reports it

    def signal(self, signum: int) -> None:
        """A signal the client passed on (SIGTERM, SIGHUP, SIGUSR1, SIGUSR2)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signum)

    async def write_input(self, data: bytes) -> None:
        """The client's standard input, once the program runs; empty ``data`` closes it.

        A program that stops reading holds its job's input here (and so, by the window, at
        the parent); one that exits or closes its input drops the rest, as a pipe does.
        """
        await self.launched.wait()
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None or not self.stdin_open:
            return
        try:
            if data:
                stdin.write(data)
                await stdin.drain()
            else:
                self.stdin_open = False
                stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            self.stdin_open = False

    async def _prepare(self) -> frozenset[int]:
        if not self.error:
            try:
                # always a thread: it also looks the user up, which may wait on a directory
                self.unpacker = await asyncio.to_thread(self._unpacker)
            except users.UserRefused as e:
                self.error = str(e)
            except (BundleError, OSError) as e:
                self.error = f"bundle refused: {e}"
            except Exception as e:  # anything a strange job does to us costs that job only
                log.warning("job %s: %r", self.jid, e)
                self.error = f"cannot take the job: {e}"
        if self.error or self.unpacker is None or self.unpacker.complete:
            self._launch()
            return frozenset()
        self.needed = frozenset(self.unpacker.needed)
        return self.needed

    def _unpacker(self) -> Unpacker | None:
        """Check who runs the job and what it ships, then make what needs no bytes.

        None when a shared tree holds every file: only the overlay's directories are made.
        """
        h = self.header
        self.user = users.resolve(h.user, h.uid, h.gid, self.node.name)
        if self.user.switches and not self.private:
            raise users.UserRefused(
                "-p=false writes into binRoot, which every user's jobs share: on a tree run "
                "by root only root's jobs may use it; drop -p=false"
            )
        entries = check_manifest(h.manifest, h.total)
        if self._may_share():
            assert self.trees is not None
            self.shared = self.trees.take(entries, self.user if self.user.switches else None)
            if self.shared is not None:
                self._make_layers()
                return None
        mode = 0o700 if self.private else 0o755  # a job's own staging, or binRoot itself
        return Unpacker(Path(self.files_root), entries, self.jid, self.cache, root_mode=mode)

    def _may_share(self) -> bool:
        """A private run (not gproc cp) on a root daemon, with paths an overlay can name."""
        return (
            self.trees is not None
            and self.private
            and self.header.mode != "copy"
            and trees.usable(self.node.bin_root, self.files_root, self.work, self.trees.path)
        )

    def _make_layers(self) -> None:
        """The overlay's upper directory (the job's staging: its user's, 0700) and its work
        directory (root's), both empty, both beside binRoot."""
        assert self.user is not None
        os.mkdir(self.files_root, 0o700)
        os.mkdir(self.work, 0o700)
        if self.user.switches:
            os.chown(self.files_root, self.user.uid, self.user.gid)

    async def needs(self) -> frozenset[int]:
        assert self.prepared is not None
        return await self.prepared

    async def feed(self, chunks: list[Data]) -> None:
        """Write chunks of needed files (in a thread); launch when the last file is in.

        A kill waits for a write in progress (:attr:`writing`) before it removes the files,
        so the two never run at once.
        """
        if self.error or self.killed or self.unpacker is None or self.task is not None:
            return
        wanted = [chunk for chunk in chunks if chunk.index in self.needed]
        if not wanted:
            return
        unpacker = self.unpacker
        self.writing = self._step(len(wanted), self._write, unpacker, wanted)
        try:
            await self.writing
        except (BundleError, OSError) as e:
            self.error = f"bundle refused: {e}"
            await self._step(len(self.header.manifest), unpacker.abort)
        finally:
            self.writing = None
        if self.killed:
            return
        if self.error or unpacker.complete:
            self._launch()

    @staticmethod
    def _write(unpacker: Unpacker, chunks: list[Data]) -> None:
        for chunk in chunks:
            unpacker.feed(chunk.index, chunk.data, chunk.digest)

    def _launch(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            if self.late is not None:
                status = await self._give_up()
            elif self.error:
                status = await self._fail(self.error, EXIT_CANNOT_RUN)
            else:
                status = await self._execute()
            if self.late is not None:
                status = EXIT_TIMEOUT
                self._up(Late(self.jid, [self.node.name], self.late))
            self._up(Exit(self.jid, self.node.name, status))
        finally:
            self._stop_timers()
            await self._cleanup()
            self.done = True
            if self.job is not None:
                self.job.maybe_finish()

    async def _disk_settled(self) -> None:
        """Let disk work in a thread (preparing, writing chunks) finish before anything
        removes the files it works on."""
        for step in (self.prepared, self.writing):
            if step is not None and not step.done():
                await asyncio.gather(step, return_exceptions=True)

    async def _give_up(self) -> int:
        """A deadline passed before the program started: stop unpacking, say so."""
        await self._disk_settled()
        limit = self.header.start_ms if self.late == "start" else self.header.run_ms
        switch = "-t" if self.late == "start" else "-u"
        why = f"the program had not started {limit / 1000:g}s after the job arrived ({switch})"
        return await self._fail(why, EXIT_TIMEOUT)

    def _stop_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        self.launched.set()

    async def _execute(self) -> int:
        root = self.node.bin_root
        os.makedirs(root, exist_ok=True)
        user = self.user
        assert user is not None  # resolved before anything was unpacked
        copy = self.header.mode == "copy"  # gproc cp: place the staged files, as the user
        if copy:
            argv = placement(self.files_root, self.header, user.switches, move=self.private)
        else:
            argv = program_argv(self.header, root)
        launch = sandbox.Launch(
            argv=argv,
            env=program_env(self.header, root, self.node.name, self.jid, user),
            cwd="/" if copy else root + self.header.cwd,
            bind=(self.files_root, root) if self.private and not copy else None,
            lower=self.shared.path if self.shared is not None else None,
            work=self.work if self.shared is not None else None,
            user=user if user.switches else None,
            stdin=self.header.stdin,
        )
        if self.private and user.switches and self.shared is None:
            await asyncio.to_thread(users.give_tree, self.files_root, user)
        if self.killed:
            return EXIT_KILLED
        try:
            t = time.perf_counter()
            if self.launcher is not None:
                self.proc = await self.launcher.start(launch)
            else:
                self.proc = await sandbox.start(launch)
            log.debug("job %s: started in %.1f ms", self.jid, (time.perf_counter() - t) * 1e3)
        except sandbox.SandboxError as e:
            return await self._fail(str(e), EXIT_CANNOT_RUN)
        except (OSError, ValueError) as e:
            code = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_RUN
            why = getattr(e, "strerror", None) or e
            return await self._fail(f"cannot start {launch.argv[0]}: {why}", code)
        self.launched.set()
        if self.killed or self.late is not None:  # killed, or timed out, while it started
            sandbox.kill_group(self.proc)
        pumps = asyncio.gather(self._pump(self.proc.stdout, 1), self._pump(self.proc.stderr, 2))
        try:
            status = sandbox.exit_status(await self.proc.wait())
            sandbox.kill_group(self.proc, force=True)  # what it left running dies with it
            await pumps
        finally:
            if not pumps.done():  # the daemon is stopping: nobody reads the output any more
                sandbox.kill_group(self.proc, force=True)
                pumps.cancel()
                pumps.add_done_callback(lambda f: f.cancelled() or f.exception())
        return status

    async def _pump(self, stream: asyncio.StreamReader | None, fd: int) -> None:
        """The program's output, up the tree as fast as the job's reader takes it."""
        assert stream is not None and self.job is not None
        window = self.job.local_window
        while chunk := await stream.read(64 << 10):
            cost = charge(len(chunk))
            await window.take(cost)
            self._up(Out(self.jid, self.node.name, fd, chunk), cost)

    async def _fail(self, message: str, status: int) -> int:
        log.warning("job %s: %s", self.jid, message)
        text = f"gproc: {message}\n".encode()
        if self.job is not None:
            await self.job.local_window.take(charge(len(text)))
        self._up(Out(self.jid, self.node.name, 2, text), charge(len(text)))
        return status

    def _up(self, frame: Frame, cost: int = 0) -> None:
        if self.job is not None:
            self.job.send_up(frame, cost=cost)

    async def _cleanup(self) -> None:
        unpacker, self.unpacker = self.unpacker, None
        t = time.perf_counter()
        await asyncio.to_thread(self._remove, unpacker)  # one trip to a worker thread
        log.debug("job %s: cleaned up in %.1f ms", self.jid, (time.perf_counter() - t) * 1e3)

    def _step(self, size: int, work: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """A file step over ``size`` frames or files: at once when it is small and binRoot is
        in memory, else in a worker thread (gproc.diskwork says why)."""
        return diskwork.step(self.node.in_memory and size <= diskwork.SMALL_STEP, work, *args)

    def _remove(self, unpacker: Unpacker | None) -> None:
        """What the job left on disk: a half-written bundle, and the staging directory."""
        if unpacker is not None:
            unpacker.abort()
        if self.private:
            shutil.rmtree(self.files_root, ignore_errors=True)
        shared, self.shared = self.shared, None
        if shared is not None and self.trees is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.trees.give_back(shared)

    async def kill(self) -> None:
        self.killed = True
        self._stop_timers()
        if self.proc is not None:
            sandbox.kill_group(self.proc)
        await self._disk_settled()
        if self.task is None:
            await self._cleanup()
            self.done = True
        elif not self.task.done():
            try:
                await within(asyncio.shield(self.task), 5)
            except asyncio.TimeoutError:
                log.error("job %s: program did not die after SIGKILL", self.jid)


class Inflow:
    """A job's file chunks arriving from the parent: queued within the window granted, then
    written here (in a thread) and forwarded below, and credited back to the parent."""

    def __init__(self, job: Job, run: NodeRun | None, parent: Conn):
        self.job = job
        self.run = run
        self.parent = parent
        self.queue: collections.deque[Data | Input] = collections.deque()
        self.held = 0
        self.arrived = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    def accept(self, frame: Data | Input) -> None:
        """Called by the parent loop: never waits; a parent that overruns the window is cut."""
        self.held += charge(len(frame.data))
        if self.held > DOWN_WINDOW + charge(len(frame.data)):
            raise ProtocolError(f"the parent overran job {self.job.jid}'s file window")
        if type(frame) is Input and not self.job.header.stdin:
            raise ProtocolError(f"input for job {self.job.jid}, which takes none")
        self.queue.append(frame)
        self.arrived.set()

    async def _pump(self) -> None:
        while not self.job.finished.is_set():
            if not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            batch = list(self.queue)
            self.queue.clear()
            for part in _runs(batch):
                first = part[0]
                if type(first) is Input:
                    await self._both(self.job.forward_input(first.data), self._input(first.data))
                else:
                    chunks = cast(list[Data], part)
                    await self._both(self.job.forward(chunks), self._files(chunks))
            size = sum(charge(len(frame.data)) for frame in batch)
            self.held -= size
            self.parent.send_nowait(Credit(self.job.jid, size))
            await asyncio.sleep(0)  # one batch at a time: pings and other jobs go between

    async def _files(self, chunks: list[Data]) -> None:
        if self.run is not None:
            await self.run.feed(chunks)

    async def _input(self, data: bytes) -> None:
        if self.run is not None:
            await self.run.write_input(data)

    @staticmethod
    async def _both(below: Coroutine[Any, Any, None], here: Coroutine[Any, Any, None]) -> None:
        """Forward below while writing here; both are done (and retrieved) before credit."""
        local = asyncio.ensure_future(here)
        try:
            await below
        finally:
            await asyncio.gather(local, return_exceptions=True)


def _runs(batch: list[Data | Input]) -> list[list[Data | Input]]:
    """The batch cut where file chunks and input alternate; each input chunk on its own."""
    runs: list[list[Data | Input]] = []
    for frame in batch:
        if type(frame) is Input or not runs or type(runs[-1][0]) is Input:
            runs.append([frame])
        else:
            runs[-1].append(frame)
    return runs


# ---------------------------------------------------------------- the daemon


async def dial_parent(host: str, port: int, key: bytes, name: str) -> Conn:
    """Connect to the parent, retrying until it is up; the handshake failing is final."""
    attempt = 0
    while True:
        try:
            reader, writer = await wire.open_connection(host, port)
            break
        except OSError as e:
            attempt += 1
            if attempt in (1, 20) or attempt % 120 == 0:
                log.info(
                    "%s: parent %s:%d not reachable yet (%s); retrying",
                    name,
                    host,
                    port,
                    e.strerror or e,
                )
            await asyncio.sleep(RETRY_SECONDS)
    conn = Conn(reader, writer)
    await handshake(conn, key, dialer=True, role="slave")
    return conn


async def register(conn: Conn, hop: Hop, addr: str) -> str:
    await conn.send(Register(hop.node_id, hop.name, addr, hop.subtrees()))
    reply = await within(conn.recv(), 10)
    if reply is None:
        raise ProtocolError("parent closed the connection during registration")
    if type(reply) is Refused:
        raise ProtocolError(f"parent refused registration: {reply.reason}")
    if type(reply) is not Welcome:
        raise ProtocolError("parent did not welcome us")
    return reply.parent


class Slave:
    """A slave daemon: one hop with a parent above and a local runner."""

    def __init__(
        self,
        node: NodeConfig,
        node_id: int,
        listen: tuple[str, int],
        parent: tuple[str, int],
        key: bytes,
        heartbeat: float = HEARTBEAT,
        pid_file: str | None = None,
        reconnect: float = 0.0,
    ):
        self.node = node
        self.reconnect = reconnect  # seconds to come back in when the parent goes; 0: exit
        self.pid_file = pid_file  # written once serving, removed on the way out
        self.listen = listen
        self.parent = parent
        self.key = key
        self.hop = Hop(node.name, node_id, key, self._tree_changed, heartbeat)
        self.up: Conn | None = None
        self.cache: BlobCache | None = None
        self.trees: TreeStore | None = None
        self.launcher: sandbox.Launcher | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflows: dict[str, Inflow] = {}

    def _tree_changed(self) -> None:
        if self.up is not None:
            self.up.send_nowait(Subtree(self.hop.subtrees()))

    async def run(self) -> None:
        """Serve children, join the parent, relay jobs until the parent goes away."""
        roots = (self.node.bin_root, self.node.stage_root, self.node.cache_root)
        for directory in roots:
            await asyncio.to_thread(users.claim_dir, directory, "-binRoot")
        await asyncio.to_thread(_empty, self.node.stage_root)  # a killed predecessor's leftovers
        self.node = replace(self.node, in_memory=all(map(diskwork.in_memory, roots)))
        if self.node.cache_bytes > 0:
            root, size = Path(self.node.cache_root), self.node.cache_bytes
            self.cache = await asyncio.to_thread(BlobCache, root, size)
            if os.geteuid() == 0:  # an overlay needs root (in a user namespace, a new kernel)
                where = root / "trees"
                self.trees = await asyncio.to_thread(TreeStore, where, self.cache)
        if self.node.launcher:
            self.launcher = sandbox.Launcher()
            self.launcher.ensure()  # its interpreter starts now, not on the first job's path
        await self.hop.serve(*self.listen)
        log.info("%s: serving children on %s:%d", self.node.name, *self.listen)
        if self.pid_file:
            pidfile.write(self.pid_file)
        try:
            await self._join_and_serve()
        finally:
            if self.launcher is not None:
                self.launcher.close()  # it kills the jobs still running
            if self.pid_file:
                pidfile.remove_if_mine(self.pid_file)

    async def _join_and_serve(self) -> None:
        """Register with the parent and serve it; with ``-reconnect S``, when the parent goes
        away, keep the children and register again within S seconds (a parent restarting,
        as in a rolling upgrade) instead of exiting."""
        deadline: float | None = None
        try:
            while True:
                conn = await self._join(deadline)
                if conn is None:
                    log.warning(
                        "%s: parent did not come back within %gs; exiting",
                        self.node.name,
                        self.reconnect,
                    )
                    return
                await self._serve_parent(conn)
                if self.reconnect <= 0:
                    return
                deadline = asyncio.get_running_loop().time() + self.reconnect
                log.warning(
                    "%s: keeping %d children; registering again within %gs (-reconnect)",
                    self.node.name,
                    len(self.hop.children),
                    self.reconnect,
                )
        finally:
            await self.hop.close()

    async def _join(self, deadline: float | None) -> Conn | None:
        """Dial and register; before ``deadline`` (a reconnect) any failure is tried again."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                dial = dial_parent(*self.parent, self.key, self.node.name)
                conn = await (dial if remaining is None else within(dial, remaining))
                addr = self.listen[0]
                if addr in ("0.0.0.0", "::", ""):
                    addr = conn.writer.get_extra_info("sockname")[0]
                parent_name = await register(conn, self.hop, f"{addr}:{self.listen[1]}")
            except (ConnectionError, ProtocolError, OSError, asyncio.TimeoutError) as e:
                if deadline is None:
                    raise
                log.info("%s: parent not back yet (%s)", self.node.name, e or type(e).__name__)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            log.info(
                "%s: registered with %s (%s:%d) as id %d",
                self.node.name,
                parent_name,
                *self.parent,
                self.hop.node_id,
            )
            return conn

    async def _serve_parent(self, conn: Conn) -> None:
        """Relay the parent's frames until it goes away; its jobs die with the link."""
        self.up = conn
        watchdog = asyncio.ensure_future(keep_alive(lambda: [conn], self.hop.heartbeat, log))
        verb = "exiting" if self.reconnect <= 0 else "waiting for it"
        try:
            await self._parent_loop(conn)
            log.warning("%s: parent gone; killing jobs and %s", self.node.name, verb)
        except (ConnectionError, ProtocolError) as e:
            log.warning("%s: parent gone (%s); killing jobs and %s", self.node.name, e, verb)
        except asyncio.CancelledError:
            log.info("%s: stopping", self.node.name)
            conn.send_nowait(Bye())  # stopped, not lost: the parent forgets us
            raise
        finally:
            self.up = None
            watchdog.cancel()
            for job in list(self.hop.jobs.values()):  # their upstream is gone
                await job.kill()
            await conn.close()

    async def _parent_loop(self, conn: Conn) -> None:
        """Read the parent's frames; nothing here waits on a job."""
        while True:
            try:
                frame = await conn.recv()
            except BadJob as e:
                self._refuse(e, conn)
                continue
            if frame is None:
                return
            kind = type(frame)
            if kind is JobHeader:
                if frame.job in self.hop.jobs:
                    log.warning("%s: ignored a repeated job id %s", self.node.name, frame.job)
                else:
                    await self._start(frame, conn)
            elif kind is Data or kind is Input:
                inflow = self.inflows.get(frame.job)
                if inflow is not None:
                    inflow.accept(frame)
            elif kind is Signal:
                job = self.hop.jobs.get(frame.job)
                if job is not None:
                    job.signal(frame.signum)
            elif kind is Credit:
                job = self.hop.jobs.get(frame.job)
                if job is not None and job.up_window is not None:
                    job.up_window.give(frame.size)
            elif kind is Kill:
                job = self.hop.jobs.get(frame.job)
                if job is not None:
                    self._spawn(job.kill())  # waiting for it must not stall the link
            elif kind is not Ping:
                raise ProtocolError(f"unexpected {kind.__name__} frame from the parent")

    def _refuse(self, bad: BadJob, conn: Conn) -> None:
        """A job whose header this node cannot accept fails here, with the reason."""
        log.warning("job %s: %s", bad.job, bad)
        if bad.job in self.hop.jobs:
            return
        message = f"gproc: {self.node.name} refused the job: {bad}\n".encode()
        for frame in (
            Need(bad.job, []),
            Out(bad.job, self.node.name, 2, message),
            Exit(bad.job, self.node.name, EXIT_CANNOT_RUN),
            Done(bad.job),
        ):
            conn.send_nowait(frame)

    async def _start(self, header: JobHeader, conn: Conn) -> None:
        """Join the job: relay it below and run it here; a bad spec fails only this job."""
        problem = None
        try:
            spec = nodespec.parse(header.spec) if header.spec else ()
        except nodespec.SpecError as e:
            spec, problem = (), f"bad job header: {e}"
        runs_here = not header.only or self.node.name in header.only  # else: relay only
        run = (
            NodeRun(self.node, header, problem, self.cache, self.trees, self.launcher)
            if runs_here
            else None
        )
        job = self.hop.new_job(header, conn, run, header.job, Window(UP_WINDOW))
        if run is not None:
            run.attach(job)
        inflow = self.inflows[job.jid] = Inflow(job, run, conn)
        await job.open(spec)
        self._spawn(self._report_needs(job, conn))
        self._spawn(self._forget(job, inflow))

    async def _forget(self, job: Job, inflow: Inflow) -> None:
        await job.finished.wait()
        inflow.task.cancel()
        self.inflows.pop(job.jid, None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _report_needs(job: Job, conn: Conn) -> None:
        """Tell the parent which files this subtree lacks, once every child has said so."""
        files = await job.needs()
        conn.send_nowait(Need(job.jid, sorted(files)))


def _empty(directory: str) -> None:
    """Make the staging root empty; others may pass through it (0711) but not list it."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o711)
    for entry in os.scandir(directory):
        shutil.rmtree(entry.path, ignore_errors=True)
