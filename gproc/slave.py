"""The slave daemon (``gproc s``): registers with its parent, runs jobs, serves its children.

A slave is a relay hop (see gproc.relay) plus a local runner: when its parent selects it for a
job, the slave unpacks the job's files under a per-job staging directory (or straight into
binRoot with ``-p=false``) as the chunks pass through, forwards the same chunks to its own
selected children, then forks the program. As in the original gproc, a slave exits when its
parent goes away: its jobs are killed and its children, seeing it go, exit in turn.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gproc import nodespec, sandbox
from gproc.bundle import BundleError, Unpacker, check_manifest
from gproc.cache import BlobCache
from gproc.relay import Hop, Job, LocalRunner, check_header
from gproc.stream import HEARTBEAT, Conn, handshake, keep_alive
from gproc.wire import Frame, ProtocolError

log = logging.getLogger("gproc.slave")

EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_KILLED = 128 + 9
JOB_ID = re.compile(r"[0-9a-f]{1,32}")
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

    @property
    def stage_root(self) -> str:
        return self.bin_root.rstrip("/") + ".stage"

    @property
    def cache_root(self) -> str:
        return self.bin_root.rstrip("/") + ".cache"


def program_argv(header: Frame, root: str) -> list[str]:
    """The argv to exec for a job whose files sit under ``root``.

    The default runs the shipped loader with the shipped library directories, so a node whose
    own libraries differ or are missing still runs the binary; ``env`` is the original's
    LD_LIBRARY_PATH way; ``local`` runs the node's own program; ``direct`` execs a shipped
    non-ELF file (a script) as it is.
    """
    argv, mode = list(header["argv"]), header["mode"]
    if mode == "local":
        return argv
    prog = root + header["prog"]
    if mode == "loader" and header.get("interp"):
        dirs = ":".join(root + d for d in header.get("libdirs", []))
        extra = ["--argv0", argv[0]] if header.get("argv0") else []
        return [root + header["interp"], "--library-path", dirs, *extra, prog, *argv[1:]]
    return [prog, *argv[1:]]


def program_env(header: Frame, root: str, node: str, jid: str) -> dict[str, str]:
    env = {str(k): str(v) for k, v in header.get("env", {}).items()}
    env.update(GPROC_NODE=node, GPROC_JOB=jid)
    if header["mode"] == "env" and header.get("libdirs"):
        env["LD_LIBRARY_PATH"] = ":".join(root + d for d in header["libdirs"])
    return env


class NodeRun(LocalRunner):
    """This node's share of a job: unpack as chunks arrive, then run and report."""

    def __init__(
        self,
        node: NodeConfig,
        header: Frame,
        jid: str,
        problem: str | None = None,
        cache: BlobCache | None = None,
    ):
        self.node = node
        self.header = header
        self.jid = jid
        self.job: Job | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.error = problem
        self.killed = False
        self.task: asyncio.Task[None] | None = None
        self.private = bool(header.get("private", True))
        self.files_root = os.path.join(node.stage_root, jid) if self.private else node.bin_root
        self.unpacker: Unpacker | None = None
        if problem:
            return
        try:
            entries = check_manifest(header.get("manifest"), header.get("total"))
            self.unpacker = Unpacker(Path(self.files_root), entries, jid, cache)
            self.needed = frozenset(self.unpacker.needed)
        except (BundleError, OSError) as e:
            self.error = f"bundle refused: {e}"

    def attach(self, job: Job) -> None:
        self.job = job
        if self.error or (self.unpacker is not None and self.unpacker.complete):
            self._launch()

    def feed(self, index: int, data: bytes) -> None:
        if self.error or self.unpacker is None or self.task is not None:
            return
        try:
            self.unpacker.feed(index, data)
        except (BundleError, OSError) as e:
            self.error = f"bundle refused: {e}"
            self.unpacker.abort()
        if self.error or self.unpacker.complete:
            self._launch()

    def _launch(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            status = (
                await self._execute()
                if not self.error
                else await self._fail(self.error, EXIT_CANNOT_RUN)
            )
            await self._up({"t": "exit", "job": self.jid, "node": self.node.name, "status": status})
        finally:
            self._cleanup()
            self.done = True
            if self.job is not None:
                self.job.maybe_finish()

    async def _execute(self) -> int:
        root = self.node.bin_root
        os.makedirs(root, exist_ok=True)
        launch = sandbox.Launch(
            argv=program_argv(self.header, root),
            env=program_env(self.header, root, self.node.name, self.jid),
            cwd=root + self.header["cwd"],
            bind=(self.files_root, root) if self.private else None,
        )
        if self.killed:
            return EXIT_KILLED
        try:
            t = time.perf_counter()
            self.proc = await sandbox.start(launch)
            log.debug("job %s: started in %.1f ms", self.jid, (time.perf_counter() - t) * 1e3)
        except sandbox.SandboxError as e:
            return await self._fail(str(e), EXIT_CANNOT_RUN)
        except (OSError, ValueError) as e:
            code = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_RUN
            why = getattr(e, "strerror", None) or e
            return await self._fail(f"cannot start {launch.argv[0]}: {why}", code)
        if self.killed:  # the kill came while the program was being started
            sandbox.kill_group(self.proc)
        pumps = asyncio.gather(self._pump(self.proc.stdout, 1), self._pump(self.proc.stderr, 2))
        status = sandbox.exit_status(await self.proc.wait())
        sandbox.kill_group(self.proc, force=True)  # what the program left running dies with it
        await pumps
        return status

    async def _pump(self, stream: asyncio.StreamReader | None, fd: int) -> None:
        assert stream is not None
        while chunk := await stream.read(64 << 10):
            await self._up(
                {"t": "out", "job": self.jid, "node": self.node.name, "fd": fd, "b": chunk}
            )

    async def _fail(self, message: str, status: int) -> int:
        log.warning("job %s: %s", self.jid, message)
        await self._up(
            {
                "t": "out",
                "job": self.jid,
                "node": self.node.name,
                "fd": 2,
                "b": f"gproc: {message}\n".encode(),
            }
        )
        return status

    async def _up(self, frame: Frame) -> None:
        if self.job is not None and not self.job.killed:
            await self.job.send_up(frame)

    def _cleanup(self) -> None:
        if self.unpacker is not None:
            self.unpacker.abort()
        if self.private:
            t = time.perf_counter()
            shutil.rmtree(self.files_root, ignore_errors=True)
            log.debug(
                "job %s: staging removed in %.1f ms", self.jid, (time.perf_counter() - t) * 1e3
            )

    async def kill(self) -> None:
        self.killed = True
        if self.proc is not None:
            sandbox.kill_group(self.proc)
        if self.task is None:
            self._cleanup()
            self.done = True
        elif not self.task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.task), 5)
            except asyncio.TimeoutError:
                log.error("job %s: program did not die after SIGKILL", self.jid)


# ---------------------------------------------------------------- the daemon


async def dial_parent(host: str, port: int, key: bytes, name: str) -> Conn:
    """Connect to the parent, retrying until it is up; the handshake failing is final."""
    attempt = 0
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
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
    await handshake(conn, key, "dial", "slave")
    return conn


async def register(conn: Conn, hop: Hop, addr: str) -> str:
    await conn.send(
        {
            "t": "register",
            "id": hop.node_id,
            "name": hop.name,
            "addr": addr,
            "children": hop.subtrees(),
        }
    )
    reply = await asyncio.wait_for(conn.recv(), 10)
    if reply is None:
        raise ProtocolError("parent closed the connection during registration")
    if reply.get("t") == "refused":
        raise ProtocolError(f"parent refused registration: {reply.get('reason')}")
    if reply.get("t") != "welcome":
        raise ProtocolError("parent did not welcome us")
    return str(reply.get("parent", "?"))


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
    ):
        self.node = node
        self.listen = listen
        self.parent = parent
        self.key = key
        self.hop = Hop(node.name, node_id, key, self._tree_changed, heartbeat)
        self.up: Conn | None = None
        self.cache: BlobCache | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def _tree_changed(self) -> None:
        if self.up is not None:
            self.up.send_nowait({"t": "tree", "children": self.hop.subtrees()})

    async def run(self) -> None:
        """Serve children, join the parent, relay jobs until the parent goes away."""
        _empty(self.node.stage_root)  # what a killed predecessor left behind
        if self.node.cache_bytes > 0:
            self.cache = BlobCache(Path(self.node.cache_root), self.node.cache_bytes)
        await self.hop.serve(*self.listen)
        log.info("%s: serving children on %s:%d", self.node.name, *self.listen)
        conn = await dial_parent(*self.parent, self.key, self.node.name)
        addr = self.listen[0]
        if addr in ("0.0.0.0", "::", ""):
            addr = conn.writer.get_extra_info("sockname")[0]
        parent_name = await register(conn, self.hop, f"{addr}:{self.listen[1]}")
        self.up = conn
        log.info(
            "%s: registered with %s (%s:%d) as id %d",
            self.node.name,
            parent_name,
            *self.parent,
            self.hop.node_id,
        )
        watchdog = asyncio.ensure_future(keep_alive(lambda: [conn], self.hop.heartbeat, log))
        try:
            await self._parent_loop(conn)
            log.warning("%s: parent gone; killing jobs and exiting", self.node.name)
        except (ConnectionError, ProtocolError) as e:
            log.warning("%s: parent gone (%s); killing jobs and exiting", self.node.name, e)
        except asyncio.CancelledError:
            log.info("%s: stopping", self.node.name)
            conn.send_nowait({"t": "bye"})  # stopped, not lost: the parent forgets us
            raise
        finally:
            watchdog.cancel()
            await self.hop.close()
            await conn.close()

    async def _parent_loop(self, conn: Conn) -> None:
        while (frame := await conn.recv()) is not None:
            kind, jid = frame["t"], frame.get("job")
            if kind == "job":
                if isinstance(jid, str) and JOB_ID.fullmatch(jid) and jid not in self.hop.jobs:
                    await self._start(frame, jid, conn)
                else:
                    log.warning(
                        "%s: ignored a job with a bad or repeated id %r", self.node.name, jid
                    )
            elif kind == "data" and jid in self.hop.jobs and _is_chunk(frame):
                await self.hop.jobs[jid].feed(frame["f"], frame["b"])
            elif kind == "kill" and jid in self.hop.jobs:
                self._spawn(self.hop.jobs[jid].kill())  # waiting for it must not stall the link
            elif kind not in ("data", "kill", "ping"):
                raise ProtocolError(f"unexpected {kind!r} frame from the parent")

    async def _start(self, header: Frame, jid: str, conn: Conn) -> None:
        """Join the job: relay it below and run it here; a bad header fails only this job."""
        problem = None
        try:
            check_header(header)
            spec = nodespec.parse(header["spec"]) if header["spec"] else ()
        except (nodespec.SpecError, KeyError, TypeError, ValueError) as e:
            spec, problem = (), f"bad job header: {e}"
        try:
            run = NodeRun(self.node, header, jid, problem, self.cache)
        except Exception as e:  # anything a strange job does to us costs that job only
            log.warning("job %s: %r", jid, e)
            run = NodeRun(self.node, header, jid, f"cannot take the job: {e}", self.cache)
        job = await self.hop.start_job(header, conn, run, spec, jid=jid)
        self._spawn(self._report_needs(job, conn))
        run.attach(job)  # after the report is queued: the fork must not delay the tree's answer

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _report_needs(job: Job, conn: Conn) -> None:
        """Tell the parent which files this subtree lacks, once every child has said so."""
        files = await job.needs()
        conn.send_nowait({"t": "need", "job": job.jid, "files": sorted(files)})


def _is_chunk(frame: Frame) -> bool:
    return isinstance(frame.get("f"), int) and isinstance(frame.get("b"), bytes)


def _empty(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for entry in os.scandir(directory):
        shutil.rmtree(entry.path, ignore_errors=True)
