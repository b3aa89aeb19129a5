"""The exec and info clients (``gproc e``, ``gproc i``), talking to the master's Unix socket.

``gproc e`` packs the program, its ELF closure, the ``-f`` files and the current directory
(recreated empty on the nodes, where the program starts), sends the master the job header,
waits for the plan (so a spec that selects nothing costs no transfer), streams the file bytes
while already printing what comes back, and exits with the job's status.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from gproc import nodespec, users
from gproc.bundle import BundleError, Entry, Packer, chunks, total_size
from gproc.errors import GprocError
from gproc.output import FOLD_ABOVE, Printer, fold_levels
from gproc.progress import ExecProgress
from gproc.protocol import (
    LENGTH,
    MAX_FRAME,
    Data,
    Done,
    Drain,
    Draining,
    Error,
    Exit,
    Frame,
    Info,
    Input,
    JobHeader,
    Late,
    Lost,
    Need,
    Out,
    Plan,
    ProtocolError,
    Signal,
    Tree,
    TreeReply,
    decode,
    frame_bytes,
)

if TYPE_CHECKING:
    from gproc.jsonout import JsonPrinter

INPUT_CHUNK = 64 << 10  # bytes of standard input per frame


class ClientError(GprocError):
    """Something the user can fix: the message says what and how; exit status 1."""


@dataclass
class ExecOptions:
    spec: str
    argv: list[str]
    uds: str = "/tmp/g"
    root: str = "/"
    libpath: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    private: bool = True
    localbin: bool = False
    ldenv: bool = False
    skip_missing: bool = False
    raw: bool = False
    fold: bool = False
    json: bool = False
    export: str = "ALL"
    only: list[str] = field(default_factory=list)  # -w: run on these nodes (names)
    exclude: list[str] = field(default_factory=list)  # -x: never on these
    stdin: bool = False  # send our standard input to the programs (not a terminal, no -n)
    start_timeout: float = 0.0  # -t
    run_timeout: float = 0.0  # -u
    copy: bool = False  # gproc cp: argv is DEST SOURCE..., the sources are shipped


def exported_env(export: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment shipped with the job, as srun's --export: ALL, NONE or NAME,NAME...

    What is not shipped never leaves this machine; the nodes then set what a login would
    (USER, LOGNAME, HOME, SHELL, PATH) for the job's user.
    """
    environ = dict(os.environ) if environ is None else environ
    if export == "ALL":
        return environ
    if export == "NONE":
        return {}
    names = [n.strip() for n in export.split(",")]
    bad = [n for n in names if not n or "=" in n or n in ("ALL", "NONE")]
    if bad:
        raise ClientError(
            f"-export {export!r}: give ALL, NONE, or variable names separated by commas "
            f"(NAME,NAME...); {bad[0]!r} is not a name"
        )
    return {n: environ[n] for n in names if n in environ}


def build_job(opts: ExecOptions) -> tuple[JobHeader, list[Entry]]:
    """The job header and the packed files, from the user's command line."""
    from gproc import closures, elf

    if opts.spec or not opts.only:
        nodespec.parse(opts.spec)  # fail on a bad spec before any work
    packer = Packer()
    header = JobHeader(
        job="",
        spec=opts.spec,
        argv=list(opts.argv),
        env=exported_env(opts.export),
        cwd=os.getcwd(),
        mode="local",
        prog="",
        interp="",
        libdirs=[],
        argv0=False,
        private=opts.private,
        manifest=[],
        total=0,
        stdin=opts.stdin,
        start_ms=round(opts.start_timeout * 1000),
        run_ms=round(opts.run_timeout * 1000),
        only=list(opts.only),
        exclude=list(opts.exclude),
    )
    if opts.copy:
        header.mode = "copy"
        for source in opts.argv[1:]:
            packer.add_host_path(source)
    elif not opts.localbin:
        prog = elf.find_program(opts.argv[0], opts.root)
        header.prog = prog
        packed = closures.pack(prog, opts.root, opts.libpath, opts.skip_missing)
        if packed is not None:
            packer.add_entries(packed.entries)
            header.mode = "env" if opts.ldenv else "loader"
            header.interp = packed.interp
            header.libdirs = packed.libdirs
            header.argv0 = packed.argv0
        else:
            packer.add_object(opts.root, prog)
            header.mode = "direct"
    for path in opts.files:
        if not os.path.exists(path):
            raise ClientError(f"-f {path}: no such file or directory")
        packer.add_host_path(path)
    packer.add_dir(header.cwd)
    manifest = packer.manifest()
    header.manifest = [e.wire() for e in manifest]
    header.total = total_size(manifest)
    return header, manifest


class BlockingConn:
    """A framed Unix-socket connection for a client: one thread may send while one receives.

    It spares every ``gproc e`` the import of asyncio. The master's socket needs no MAC: its
    file mode says who may connect, and the kernel tells each side who the other is
    (``SO_PEERCRED``, gproc.users).
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.sending = threading.Lock()  # file bytes and signals go out from two threads

    def send(self, frame: Frame) -> None:
        data = frame_bytes(frame)
        with self.sending:
            self.sock.sendall(data)

    def send_first(self, frame: Frame) -> None:
        """The first frame; a master that refused us at once may have closed before it
        arrived, having said why: that reason, not a broken pipe, is the error."""
        try:
            self.send(frame)
        except (BrokenPipeError, ConnectionResetError):
            try:
                reply = self.recv()
            except (OSError, ProtocolError):
                reply = None
            if type(reply) is Error:
                raise ClientError(reply.message) from None
            raise

    def recv(self) -> Frame | None:
        """The next frame, or None on a clean end of stream between frames."""
        head = self.rfile.read(4)
        if not head:
            return None
        if len(head) < 4:
            raise ProtocolError("connection closed inside a frame header")
        (size,) = LENGTH.unpack(head)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame length {size} exceeds the {MAX_FRAME}-byte cap")
        body = self.rfile.read(size)
        if len(body) < size:
            raise ProtocolError(f"connection closed inside a {size}-byte frame")
        return decode(body)

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def connect(uds: str) -> BlockingConn:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(uds)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ClientError(
            f"no master answers on {uds}: start one with "
            "'gproc-deploy up 1 8 --locale local' or 'gproc m'"
        ) from None
    except PermissionError:
        sock.close()
        raise ClientError(
            f"{uds} belongs to a master you may not use (its -allow); "
            "use -defaultMasterUDS to name your tree's socket"
        ) from None
    server = users.peer_of(sock)
    if server.uid not in (0, os.geteuid()):
        sock.close()
        raise ClientError(
            f"{uds} is served by {users.describe(server.uid)}, not root or you: it may be "
            "another user's trap, so nothing was sent; use -defaultMasterUDS to name your "
            "tree's socket"
        )
    return BlockingConn(sock)


def run_exec(opts: ExecOptions, printer: Printer | None = None) -> int:
    """Run the job; the exit status of the whole job (see gproc.output)."""
    header, manifest = build_job(opts)
    progress = ExecProgress(None if opts.json or opts.raw else sys.stderr)
    if printer is None:
        chosen = _json_printer() if opts.json else Printer(raw=opts.raw, folded=opts.fold)
        printer = progress.around(chosen)
    conn = connect(opts.uds)
    sender = Sender(conn, manifest, progress, sys.stdin.buffer if opts.stdin else None)
    try:
        conn.send_first(header)
        with Forwarder(conn):
            _follow(conn, printer, sender)
    except BrokenPipeError:
        raise  # our own stdout closed (gproc e ... | head): not the master's doing
    except OSError as e:
        raise ClientError(sender.error or f"lost the master: {e.strerror or e}") from None
    finally:
        progress.close()
        conn.close()
    return printer.finish()


def _json_printer() -> JsonPrinter:
    """-json's printer, imported only then: json is not among what every job's start needs."""
    from gproc.jsonout import JsonPrinter

    return JsonPrinter()


FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class Forwarder:
    """While a job runs, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to ``gproc e`` go to the
    job's programs on every node (Ctrl-C, SIGINT, kills the job instead).

    The handler only queues the signal; a thread sends it, so a signal arriving while this
    thread is itself sending never waits on its own lock.
    """

    def __init__(self, conn: BlockingConn):
        self.conn = conn
        self.pending: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.saved: dict[int, object] = {}

    def __enter__(self) -> Forwarder:
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED:
                self.saved[signum] = signal.signal(signum, self._queue)
            threading.Thread(target=self._send, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self.pending.put(None)

    def _queue(self, signum: int, frame: object) -> None:
        self.pending.put(signum)

    def _send(self) -> None:
        while (signum := self.pending.get()) is not None:
            try:
                self.conn.send(Signal("", signum))
            except OSError:
                return


def _follow(conn: BlockingConn, printer: Printer, sender: Sender) -> None:
    """Read the master's frames until the job is done; file bytes go out from a thread."""
    while (frame := conn.recv()) is not None:
        kind = type(frame)
        if kind is Out:
            printer.output(frame.node, frame.fd, frame.data)
        elif kind is Exit:
            printer.exited(frame.node, frame.status)
        elif kind is Lost:
            printer.node_lost(frame.nodes, frame.reason)
        elif kind is Late:
            printer.timed_out(frame.nodes, frame.phase)
        elif kind is Plan:
            printer.planned = frame.nodes
            printer.unreachable = frame.unreachable
        elif kind is Need:
            sender.start(frame.files)
        elif kind is Error:
            why = f"; unreachable: {', '.join(frame.unreachable)}" if frame.unreachable else ""
            raise ClientError(frame.message + why)
        elif kind is Done:
            return
        else:
            raise ProtocolError(f"unexpected {kind.__name__} frame from the master")
    raise ClientError(sender.error or "the master went away before the job ended")


class Sender:
    """Sends the bytes of the files some node lacks (the rest are in the nodes' caches).

    It runs in a thread so output keeps being read meanwhile. A file that changes under it
    is fatal to the job: the socket is shut, the master kills the job, and the reading side
    reports :attr:`error`.
    """

    def __init__(
        self,
        conn: BlockingConn,
        manifest: list[Entry],
        progress: ExecProgress | None = None,
        stdin: BinaryIO | None = None,
    ):
        self.conn = conn
        self.manifest = manifest
        self.progress = progress or ExecProgress(None)
        self.stdin = stdin
        self.error: str | None = None

    def start(self, needed: list[int]) -> None:
        self.progress.sending(sum(self.manifest[i].size for i in needed))
        threading.Thread(target=self._send, args=(needed,), daemon=True).start()

    def _send(self, needed: list[int]) -> None:
        try:
            for index, chunk in chunks(self.manifest, needed):
                self.conn.send(Data("", index, chunk))
                self.progress.sent(len(chunk))
            if self.stdin is not None:
                self._send_input(self.stdin)
        except BundleError as e:
            self._abort(str(e))
        except OSError as e:
            if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
                self._abort(f"cannot read {e.filename or 'a shipped file'}: {e.strerror or e}")

    def _send_input(self, stdin: BinaryIO) -> None:
        """Our standard input, after the files, to every node's program; then its end.

        The master forwards it as the job's window allows, so a fast producer waits here.
        """
        fd = stdin.fileno()
        while data := os.read(fd, INPUT_CHUNK):
            self.conn.send(Input("", data))
        self.conn.send(Input("", b""))

    def _abort(self, why: str) -> None:
        self.error = f"{why}; the job was cancelled"
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def drain(uds: str, nodes: list[str], on: bool) -> list[str]:
    """Take nodes out of service for new jobs (or back); the jobs still running on them."""
    return _request(uds, Drain(nodes, on), Draining, "drain").busy  # type: ignore[attr-defined]


def fetch_tree(uds: str) -> Tree:
    return fetch_info(uds).tree


def fetch_info(uds: str) -> TreeReply:
    """The tree and the running jobs, as the master sees them."""
    return _request(uds, Info(), TreeReply, "info")  # type: ignore[return-value]


def _request(uds: str, frame: Frame, answer: type[Frame], what: str) -> Frame:
    """One question to the master and its one answer of kind ``answer``; its refusal, or
    anything else, is a ClientError."""
    conn = connect(uds)
    try:
        conn.send_first(frame)
        reply = conn.recv()
    finally:
        conn.close()
    if type(reply) is Error:
        raise ClientError(reply.message)
    if type(reply) is not answer:
        raise ClientError(f"the master did not answer the {what} request: {reply!r}")
    return reply


def tree_rows(tree: Tree) -> list[tuple[str, str, str, int, str]]:
    """(id path, name, address, level, state) for every node, depth first."""
    rows = [("-", tree["name"], tree["addr"], 0, tree["state"])]

    def walk(children: list[Tree], prefix: str, level: int) -> None:
        for child in children:
            path = f"{prefix}{child['id']}"
            rows.append((path, child["name"], child["addr"], level, child["state"]))
            walk(child.get("children", []), path + "/", level + 1)

    walk(tree.get("children", []), "", 1)
    return rows


def format_tree(tree: Tree) -> str:
    rows = tree_rows(tree)
    if len(rows) - 1 > FOLD_ABOVE:  # a row per node is unreadable at 1,000: fold by level
        return fold_levels(rows)
    head = ("PATH", "NAME", "ADDRESS", "LEVEL", "STATE")
    table = [head] + [(p, n, a, str(lv), s) for p, n, a, lv, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in table
    ]
    up = sum(1 for r in rows[1:] if r[4] == "up")
    lines.append(f"{len(rows) - 1} nodes below {tree['name']}: {up} up, {len(rows) - 1 - up} lost")
    return "\n".join(lines)


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): what users name their
    programs is shown to every user, and must neither add lines nor reach their terminals."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_jobs(jobs: list[list[object]]) -> str:
    """The running jobs as a table (who runs what, where, for how long)."""
    if not jobs:
        return "no jobs running"
    table = [("JOB", "USER", "PROGRAM", "NODES", "SECONDS")]
    table += [
        (str(j), printable(str(u)), printable(str(p)), printable(str(s)) or "-", str(t))
        for j, u, p, s, t in jobs
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in table
    )
