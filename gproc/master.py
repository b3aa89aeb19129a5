"""The master daemon (``gproc m``): the root of the tree, serving exec clients on a Unix socket.

The master is a relay hop that never runs jobs itself. Children register over TCP; clients
(``gproc e``, ``gproc i``) talk over a Unix socket whose mode says who may (``-allow``: 0600
for the master's own user, 0660 for a group, 0666 for everyone). The kernel tells the master
who each client is (gproc.users); the master stamps that user into the job header, and every
node runs the job as that user. Before any file byte moves, the master checks the job header
and answers with the plan (the nodes the spec selects in its view of the whole tree, and the
ids it names that no live node answers to); a spec that selects nothing is refused there. A
client that goes away before its job is done has its job killed on every node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import socket
import time

from gproc import nodespec, users, wire
from gproc.bundle import BundleError, Entry, check_manifest
from gproc.errors import GprocError
from gproc.protocol import (
    MAX_FRAME,
    BadJob,
    Data,
    Drain,
    Draining,
    Error,
    Info,
    Input,
    JobHeader,
    Need,
    Plan,
    ProtocolError,
    Signal,
    Tree,
    TreeReply,
    VersionMismatch,
    legacy_error,
)
from gproc.relay import Hop, Job, expand, unreachable
from gproc.stream import Conn, connection_handler, within

log = logging.getLogger("gproc.master")

Checked = tuple[JobHeader, nodespec.Spec, list[Entry], list[str], list[str]]

CLIENT_HELLO_TIMEOUT = 30
# A client's signals are relayed at most this often: each one is a frame on every link of its
# job and a kill() on every node, so a client sending them as fast as it can write would
# hold up every other job in the tree (signals of one kind do not queue in the kernel anyway).
SIGNAL_INTERVAL = 0.01
# One user (root apart) may hold at most this share of the master's file descriptors in client
# connections, which last as long as their jobs: else one user could take them all, and the
# master could accept nobody else (nor open the user database to look the next client up).
USER_FD_SHARE = 16


class MasterRunning(GprocError):
    """Another master already answers on the Unix socket."""


class SocketTaken(GprocError):
    """The socket path belongs to another user: the master will not take it over."""


class Master:
    def __init__(
        self,
        name: str,
        listen: tuple[str, int],
        uds: str,
        key: bytes,
        heartbeat: float,
        allow: users.Allow | None = None,
    ):
        self.name = name
        self.listen = listen
        self.uds = uds
        self.allow = allow or users.Allow()
        self.draining: set[str] = set()  # nodes new jobs leave out (gproc-deploy upgrades)
        self.hop = Hop(name, 0, key, heartbeat=heartbeat)
        self.uds_server: asyncio.base_events.Server | None = None
        self.fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.per_user = max(8, self.fds // USER_FD_SHARE)
        self.clients: collections.Counter[int] = collections.Counter()  # connections by uid

    def tree(self) -> Tree:
        return {
            "id": 0,
            "name": self.name,
            "addr": f"{self.listen[0]}:{self.listen[1]}",
            "state": "up",
            "children": self.hop.subtrees(),
        }

    def jobs(self) -> list[list[object]]:
        """The running jobs, oldest first: id, user, program name, spec, seconds running."""
        now = time.monotonic()
        return [
            [j.jid, j.header.user, os.path.basename(j.header.argv[0]), j.header.spec,
             int(now - j.started)]
            for j in sorted(self.hop.jobs.values(), key=lambda j: j.started)
        ]  # fmt: skip

    async def start(self) -> None:
        await self.hop.serve(*self.listen)
        await self._serve_uds()
        log.info(
            "master %s: children on %s:%d, clients on %s (-allow %s)",
            self.name,
            *self.listen,
            self.uds,
            self.allow,
        )

    async def _serve_uds(self) -> None:
        self._claim_path()
        old = os.umask(0o177)
        try:
            # asyncio accepts up to `backlog` connections per turn of the loop, and a refused
            # one holds its descriptor for a turn or two more: with the default (100), one
            # user's flood of connections refused at the per-user limit filled every
            # descriptor of a master limited to 256, and the next user's name lookup (which
            # opens /etc/passwd) failed. A client whose connect finds the backlog full waits.
            self.uds_server = await wire.start_unix_server(
                self._client, self.uds, backlog=self.per_user
            )
        finally:
            os.umask(old)
        if self.allow.kind == "group":
            os.chown(self.uds, -1, self.allow.gid)
        os.chmod(self.uds, self.allow.mode)

    def _nameless(self, uid: int) -> str:
        """Why a client whose uid has no name is refused: out of descriptors (the lookup
        could not open the user database: try again), or truly unknown here."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                return (
                    f"this master has no file descriptor left (of {self.fds}) to look up "
                    f"uid {uid}; try again in a moment"
                )
        return (
            f"uid {uid} has no name in this front-end's user database, so no node could run "
            "its jobs"
        )

    def _claim_path(self) -> None:
        """Make the socket's directory if needed (only root or we may change it, else the
        chmod below could be pointed elsewhere); remove a stale socket of ours, nobody else's.

        In a directory others can write (``/tmp``), anyone may create the path first and wait
        for clients: a path another user holds is refused, naming that user.
        """
        directory = os.path.dirname(os.path.abspath(self.uds))
        users.claim_dir(directory, "-defaultMasterUDS")  # else its owner could swap the socket
        try:
            st = os.lstat(self.uds)
        except FileNotFoundError:
            return
        if st.st_uid != os.geteuid():
            raise SocketTaken(
                f"{self.uds} already exists and belongs to {users.describe(st.st_uid)}, not to "
                f"{users.describe(os.geteuid())} who runs this master; remove it (as root) or "
                "give -defaultMasterUDS a path in a directory only you can write, such as "
                "/run/gproc/sock"
            )
        if _answers(self.uds):
            raise MasterRunning(
                f"a master already runs on {self.uds}; stop it first "
                "(gproc-deploy down) or pick another -defaultMasterUDS"
            )
        os.unlink(self.uds)

    async def close(self) -> None:
        if self.uds_server is not None:
            self.uds_server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds)
        await self.hop.close()

    # ------------------------------------------------------------ clients

    @connection_handler(log)
    async def _client(self, reader: wire.FrameReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, limit=MAX_FRAME)
        peer = None
        try:
            peer = users.peer_of(writer.get_extra_info("socket"))
            self.clients[peer.uid] += 1
            if peer.uid != 0 and self.clients[peer.uid] > self.per_user:
                log.warning("client pid %d refused: uid %d is at its limit", peer.pid, peer.uid)
                await conn.send(
                    Error(
                        f"{users.describe(peer.uid)} already has {self.per_user} connections "
                        f"to this master, the most one user may hold (1/{USER_FD_SHARE} of its "
                        f"{self.fds} file descriptors); wait for some of those jobs to end"
                    )
                )
                return
            name = users.user_name(peer.uid)
            refusal = self._nameless(peer.uid) if name is None else self.allow.refusal(peer, name)
            if refusal is not None:
                log.warning("client pid %d (%s) refused: %s", peer.pid, name, refusal)
                await conn.send(Error(refusal))
                return
            frame = await within(conn.recv(), CLIENT_HELLO_TIMEOUT)
            if type(frame) is Drain:
                await conn.send(self._drain(frame, peer))
            elif type(frame) is Info:
                await conn.send(TreeReply(self.tree(), self.jobs()))
            elif type(frame) is JobHeader:
                assert name is not None
                stamped = dataclasses.replace(frame, user=name, uid=peer.uid, gid=peer.gid)
                await self._job(conn, stamped)
            elif frame is not None:
                raise ProtocolError(f"unexpected {type(frame).__name__} frame from a client")
        except VersionMismatch as e:
            log.warning("client refused: %s", e)
            writer.write(legacy_error(f"this master refuses the client: {e}"))
        except BadJob as e:
            await conn.send(Error(str(e)))
        except (ProtocolError, asyncio.TimeoutError, ConnectionError) as e:
            log.warning("client dropped: %s", e or type(e).__name__)
        finally:
            try:
                await conn.close(grace=None)  # every byte of output reaches the reader
            finally:
                if peer is not None:  # its descriptor is closed only now
                    self.clients[peer.uid] -= 1
                    if not self.clients[peer.uid]:
                        del self.clients[peer.uid]

    def _drain(self, frame: Drain, peer: users.Peer) -> Draining | Error:
        """Only root or the master's own user (gproc-deploy) may take nodes out of service."""
        if peer.uid not in (0, os.geteuid()):
            return Error("only root or the master's own user may drain nodes")
        names = set(frame.nodes)
        if frame.on:
            self.draining |= names
        else:
            self.draining -= names
        log.info("%s %s", "draining" if frame.on else "back in service:", nodespec.fold(names))
        return Draining([j.jid for j in self.hop.jobs.values() if names & set(j.nodes)])

    async def _job(self, conn: Conn, header: JobHeader) -> None:
        checked = await self._check(conn, header)
        if checked is None:
            return
        header, spec, entries, nodes, missing = checked
        await conn.send(Plan(nodes, missing))
        job = self.hop.new_job(header, conn, None)
        job.nodes = nodes
        log.info("job %s: %s on %s as %s", job.jid, header.argv[0], header.spec, header.user)
        try:
            await job.open(spec)
            need = await job.needs()
            if not job.finished.is_set():  # else every node below already ended (or failed)
                await conn.send(Need("", sorted(need)))
                await self._stream(conn, job, sum(entries[i].size for i in need))
            await self._await_end(conn, job)
        finally:
            if not job.finished.is_set():
                log.warning("job %s: client went away; killing it everywhere", job.jid)
                await job.kill()

    async def _check(self, conn: Conn, header: JobHeader) -> Checked | None:
        """Check the header against the tree; None (after telling the client) to refuse."""
        me = os.geteuid()
        if me not in (0, header.uid):
            await conn.send(
                Error(
                    f"this tree runs as {users.describe(me)}, not root, so its nodes run only "
                    f"that user's jobs, not {header.user}'s; use a tree started by root"
                )
            )
            return None
        trees = self.hop.subtrees()
        named = bool(header.only or header.exclude)
        if named and not header.spec:
            header = dataclasses.replace(header, spec=covering(trees))
        try:
            spec = nodespec.parse(header.spec)
            entries = await asyncio.to_thread(check_manifest, header.manifest, header.total)
        except (nodespec.SpecError, BundleError) as e:
            await conn.send(Error(str(e)))
            return None
        nodes, missing = expand(spec, trees), unreachable(spec, trees, self.name)
        if named:
            header, nodes, missing = by_name(header, trees, nodes, missing)
        held = [n for n in nodes if n in self.draining]
        if held:  # being upgraded: left out, and said why
            nodes = [n for n in nodes if n not in self.draining]
            header = dataclasses.replace(header, only=nodes)
            missing = [*missing, f"{nodespec.fold(held)} (draining: gproc-deploy is upgrading it)"]
        if not nodes:
            what = f"node spec {header.spec!r}" + (" with -w/-x" if named else "")
            message = f"{what} selects no live node (see 'gproc i' for the tree)"
            await conn.send(Error(message, missing))
            return None
        return header, spec, entries, nodes, missing

    async def _stream(self, conn: Conn, job: Job, total: int) -> None:
        """Relay the client's file chunks (of the needed files) to the job's children."""
        received = 0
        while received < total:
            frame = await conn.recv()
            if frame is None:
                raise ConnectionResetError("client closed before sending every file byte")
            if type(frame) is Signal:
                job.signal(frame.signum)
                await asyncio.sleep(SIGNAL_INTERVAL)
                continue
            if type(frame) is not Data:
                raise ProtocolError(f"expected file data, got a {type(frame).__name__} frame")
            received += len(frame.data)
            if received > total:
                raise ProtocolError(f"client sent more than the {total} bytes asked for")
            await job.forward([frame])

    async def _await_end(self, conn: Conn, job: Job) -> None:
        """Relay the client's input and signals until the job ends; a client that goes away
        (end of stream) leaves the job to be killed."""
        finished = asyncio.ensure_future(job.finished.wait())
        try:
            while not finished.done():
                incoming = asyncio.ensure_future(conn.recv())
                await asyncio.wait({finished, incoming}, return_when=asyncio.FIRST_COMPLETED)
                if not incoming.done():
                    incoming.cancel()
                    await asyncio.gather(incoming, return_exceptions=True)
                    return
                frame = incoming.result()
                if frame is None:
                    return
                if type(frame) is Signal:
                    job.signal(frame.signum)
                    await asyncio.sleep(SIGNAL_INTERVAL)
                elif type(frame) is Input and job.header.stdin:
                    await job.forward_input(frame.data)
                else:
                    raise ProtocolError(f"unexpected {type(frame).__name__} frame from a client")
        finally:
            finished.cancel()
            await asyncio.gather(finished, return_exceptions=True)


def covering(trees: list[Tree]) -> str:
    """The spec that reaches every node of the tree (``./.`` for two levels): with -w and no
    spec, the job goes down every branch and only the named nodes run it."""

    def depth(nodes: list[Tree]) -> int:
        live = [t for t in nodes if t["state"] == "up"]
        return 1 + max((depth(t["children"]) for t in live), default=0) if live else 0

    return "/".join(["."] * max(depth(trees), 1))


def names_in(trees: list[Tree]) -> dict[str, str]:
    """Every node of the tree, live or lost, and its state."""
    found: dict[str, str] = {}
    stack = list(trees)
    while stack:
        tree = stack.pop()
        found.setdefault(tree["name"], tree["state"])
        stack.extend(tree["children"])
    return found


def by_name(
    header: JobHeader, trees: list[Tree], nodes: list[str], missing: list[str]
) -> tuple[JobHeader, list[str], list[str]]:
    """-w/-x: of the nodes the spec selects, those named and not excluded run; the rest of
    the way only relays. A name the tree does not know, or a named node that is lost, is
    reported (unreachable), never quietly dropped."""
    known = names_in(trees)
    named, excluded = set(header.only), set(header.exclude)
    strangers = sorted((named | excluded) - set(known))
    wanted = named or set(nodes)
    run = [n for n in nodes if n in wanted and n not in excluded]
    if named:  # the names say what is missing, not the whole tree the spec walks
        missing = [
            f"{n} ({known[n]})" for n in sorted(named - excluded) if known.get(n, "up") != "up"
        ]
    else:
        missing = [m for m in missing if m.split(" ", 1)[0] not in excluded]
    if strangers:
        missing.append(f"{nodespec.fold(strangers)} (not in the tree)")
    return dataclasses.replace(header, only=run, exclude=[]), run, missing


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True
