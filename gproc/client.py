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
from gproc.output import Printer
from gproc.wire import VERSION, BlockingConn, Frame, ProtocolError, Tree


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


def build_job(opts: ExecOptions) -> tuple[Frame, list[Entry]]:
    """The job header and the packed files, from the user's command line."""
    from gproc import elf

    nodespec.parse(opts.spec)  # fail on a bad spec before any work
    packer = Packer()
    header: Frame = {
        "t": "job",
        "v": VERSION,
        "spec": opts.spec,
        "argv": list(opts.argv),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "private": opts.private,
    }
    if opts.localbin:
        header["mode"] = "local"
    else:
        prog = elf.find_program(opts.argv[0], opts.root)
        if elf.is_elf(elf.resolve_in_root(opts.root, prog)):
            found = elf.closure(prog, opts.root, opts.libpath, opts.skip_missing)
            for obj in found.objects:
                packer.add_object(opts.root, obj)
            header.update(
                mode="env" if opts.ldenv else "loader",
                prog=prog,
                interp=found.interp,
                libdirs=found.libdirs,
                argv0=_loader_takes_argv0(opts.root, found.interp),
            )
        else:
            packer.add_object(opts.root, prog)
            header.update(mode="direct", prog=prog)
    for path in opts.files:
        if not os.path.exists(path):
            raise ClientError(f"-f {path}: no such file or directory")
        packer.add_host_path(path)
    packer.add_dir(header["cwd"])
    manifest = packer.manifest()
    header.update(manifest=[e.wire() for e in manifest], total=total_size(manifest))
    return header, manifest


def _loader_takes_argv0(root: str, interp: str | None) -> bool:
    """glibc's loader learned --argv0 in 2.33; look for the option in the shipped loader."""
    if not interp:
        return False
    from gproc.elf import resolve_in_root

    with open(resolve_in_root(root, interp), "rb") as f:
        return b"--argv0" in f.read()


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
        kind = frame["t"]
        if kind == "plan":
            printer.planned = list(frame.get("nodes", []))
            printer.unreachable = list(frame.get("unreachable", []))
        elif kind == "need":
            sender.start(frame.get("files", []))
        elif kind == "error":
            raise ClientError(str(frame.get("message")))
        elif kind == "done":
            return
        else:
            _show(printer, frame)
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
                self.conn.send({"t": "data", "f": index, "b": chunk})
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


def _show(printer: Printer, frame: Frame) -> None:
    """Output, exits and losses, as they arrive (nodes with every file cached start early)."""
    kind = frame["t"]
    try:
        if kind == "out":
            printer.output(frame["node"], frame["fd"], frame["b"])
        elif kind == "exit":
            printer.exited(frame["node"], frame["status"])
        elif kind == "lost":
            printer.node_lost(frame["nodes"], frame.get("reason", "lost"))
        else:
            raise ProtocolError(f"unexpected {kind!r} frame from the master")
    except (KeyError, TypeError, AttributeError):
        raise ProtocolError(f"malformed {kind!r} frame from the master") from None


def fetch_tree(uds: str) -> Tree:
    conn = connect(uds)
    try:
        conn.send({"t": "info", "v": VERSION})
        reply = conn.recv()
    finally:
        conn.close()
    if reply is None or reply.get("t") != "tree":
        raise ClientError(f"the master did not answer the info request: {reply!r}")
    return reply["tree"]


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
