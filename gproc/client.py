"""The exec and info clients (``gproc e``, ``gproc i``), talking to the master's Unix socket.

``gproc e`` packs the program, its ELF closure, the ``-f`` files and the current directory
(recreated empty on the nodes, where the program starts), sends the master the job header,
waits for the plan (so a spec that selects nothing costs no transfer), streams the file bytes
while already printing what comes back, and exits with the job's status.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

from gproc import nodespec
from gproc.bundle import BundleError, Entry, Packer, chunks, total_size
from gproc.errors import GprocError
from gproc.output import FOLD_ABOVE, Printer, fold_levels
from gproc.protocol import (
    LENGTH,
    MAX_FRAME,
    Data,
    Done,
    Error,
    Exit,
    Frame,
    Info,
    JobHeader,
    Lost,
    Need,
    Out,
    Plan,
    ProtocolError,
    Tree,
    TreeReply,
    decode,
    frame_bytes,
)


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


def build_job(opts: ExecOptions) -> tuple[JobHeader, list[Entry]]:
    """The job header and the packed files, from the user's command line."""
    from gproc import elf

    nodespec.parse(opts.spec)  # fail on a bad spec before any work
    packer = Packer()
    header = JobHeader(
        job="",
        spec=opts.spec,
        argv=list(opts.argv),
        env=dict(os.environ),
        cwd=os.getcwd(),
        mode="local",
        prog="",
        interp="",
        libdirs=[],
        argv0=False,
        private=opts.private,
        manifest=[],
        total=0,
    )
    if not opts.localbin:
        prog = elf.find_program(opts.argv[0], opts.root)
        header.prog = prog
        if elf.is_elf(elf.resolve_in_root(opts.root, prog)):
            found = elf.closure(prog, opts.root, opts.libpath, opts.skip_missing)
            for obj in found.objects:
                packer.add_object(opts.root, obj)
            header.mode = "env" if opts.ldenv else "loader"
            header.interp = found.interp or ""
            header.libdirs = list(found.libdirs)
            header.argv0 = _loader_takes_argv0(opts.root, found.interp)
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


def _loader_takes_argv0(root: str, interp: str | None) -> bool:
    """glibc's loader learned --argv0 in 2.33; look for the option in the shipped loader."""
    if not interp:
        return False
    from gproc.elf import resolve_in_root

    with open(resolve_in_root(root, interp), "rb") as f:
        return b"--argv0" in f.read()


class BlockingConn:
    """A framed Unix-socket connection for a client: one thread may send while one receives.

    It spares every ``gproc e`` the import of asyncio. The master's socket needs no MAC: its
    file permissions say who may connect.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def send(self, frame: Frame) -> None:
        self.sock.sendall(frame_bytes(frame))

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
            f"{uds} belongs to another user's master; use -defaultMasterUDS to name yours"
        ) from None
    return BlockingConn(sock)


def run_exec(opts: ExecOptions, printer: Printer | None = None) -> int:
    """Run the job; the exit status of the whole job (see gproc.output)."""
    header, manifest = build_job(opts)
    printer = printer or Printer(raw=opts.raw, folded=opts.fold)
    conn = connect(opts.uds)
    sender = Sender(conn, manifest)
    try:
        conn.send(header)
        _follow(conn, printer, sender)
    except BrokenPipeError:
        raise  # our own stdout closed (gproc e ... | head): not the master's doing
    except OSError as e:
        raise ClientError(sender.error or f"lost the master: {e.strerror or e}") from None
    finally:
        conn.close()
    return printer.finish()


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
        elif kind is Plan:
            printer.planned = frame.nodes
            printer.unreachable = frame.unreachable
        elif kind is Need:
            sender.start(frame.files)
        elif kind is Error:
            raise ClientError(frame.message)
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

    def __init__(self, conn: BlockingConn, manifest: list[Entry]):
        self.conn = conn
        self.manifest = manifest
        self.error: str | None = None

    def start(self, needed: list[int]) -> None:
        threading.Thread(target=self._send, args=(needed,), daemon=True).start()

    def _send(self, needed: list[int]) -> None:
        try:
            for index, chunk in chunks(self.manifest, needed):
                self.conn.send(Data("", index, chunk))
        except BundleError as e:
            self._abort(str(e))
        except OSError as e:
            if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
                self._abort(f"cannot read {e.filename or 'a shipped file'}: {e.strerror or e}")

    def _abort(self, why: str) -> None:
        self.error = f"{why}; the job was cancelled"
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def fetch_tree(uds: str) -> Tree:
    conn = connect(uds)
    try:
        conn.send(Info())
        reply = conn.recv()
    finally:
        conn.close()
    if type(reply) is Error:
        raise ClientError(reply.message)
    if type(reply) is not TreeReply:
        raise ClientError(f"the master did not answer the info request: {reply!r}")
    return reply.tree


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
