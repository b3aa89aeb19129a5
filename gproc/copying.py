"""``gproc cp`` and ``gproc rcp``: files to and from nodes, through the tree.

``cp`` is a job whose program places files: the sources travel as a job's files do (through
the tree, cached by content on the nodes, into the job's staging directory), then, on each
node, as the job's user, a small placement program moves each one from a private job's
staging (its own copy, removed with the job otherwise) into place when both are on one file
system, and elsewhere writes it at the destination under a temporary name and renames it
into place, keeping its mode, so nobody ever sees a half-written file. Like ``cp``, a
destination that is a directory (or ends in ``/``, or gets several sources) receives the
sources by their names.

``rcp`` is a job that runs the node's own ``tar`` on the source; each node's output is
spooled to a file on the front-end and unpacked, once that node has exited 0, into
``DEST/NAME.NODE`` (as ``clush --rcopy`` does).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import tempfile
from pathlib import Path

from gproc.errors import GprocError
from gproc.output import Printer

# Run on each node as ``python3 -I -S -c PLACE HOW STAGE DEST SOURCE...``, as the job's user;
# HOW is "move" for a private job's staging (its own files), else "copy". It imports as little
# as it can: an interpreter start is most of its cost on a node, and with shutil and secrets
# (base64, hmac, random, bz2, lzma...) it cost 27 ms of CPU instead of 10.
PLACE = r"""
import errno, os, stat, sys

how, stage, dest, sources = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
into = dest.endswith("/") or os.path.isdir(dest) or len(sources) > 1
if into and not os.path.isdir(dest):
    sys.exit(f"gproc cp: {dest} is not a directory")
files = size = 0
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

def temporary(target):
    # A new name nobody can guess, created here: never a file or symlink put there first.
    return f"{target}.gproc-{os.urandom(8).hex()}"

def moved(src, target, mode):
    # The staged file is this job's own copy, complete: moved, not copied, where it can be.
    if how != "move":
        return False
    try:
        os.chmod(src, mode)
        os.replace(src, target)
        return True
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        return False

def put_file(src, target, mode):
    global files, size
    if not moved(src, target, mode):
        write_new(src, target, mode)
    files += 1
    size += os.path.getsize(target)

def write_new(src, target, mode):
    import shutil
    tmp = os.path.join(os.path.dirname(target), "." + os.path.basename(temporary(target)))
    with open(src, "rb") as data:
        fd = os.open(tmp, NEW, 0o600)
        try:
            with open(fd, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
                os.fchmod(out.fileno(), mode)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise

def put(src, target):
    st = os.stat(src)
    if not stat.S_ISDIR(st.st_mode):
        return put_file(src, target, stat.S_IMODE(st.st_mode))
    os.makedirs(target, exist_ok=True)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        inner = os.path.join(target, entry.name)
        if entry.is_symlink():
            tmp = temporary(inner)
            os.symlink(os.readlink(entry.path), tmp)
            os.replace(tmp, inner)
        else:
            put(entry.path, inner)
    os.chmod(target, stat.S_IMODE(st.st_mode))

status = 0
for source in sources:
    name = os.path.basename(source.rstrip("/")) or source
    target = os.path.join(dest, name) if into else dest
    try:
        put(stage + source, target)
    except OSError as e:
        print(f"gproc cp: cannot copy {source} to {target}: {e.strerror}", file=sys.stderr)
        status = 1
print(f"copied {files} files, {size} bytes to {dest}")
sys.exit(status)
"""


class CopyError(GprocError):
    """A bad source or destination for cp or rcp; the message says which."""


def check_sources(sources: list[str]) -> list[str]:
    """Absolute paths of sources that exist here (files, directories, symlinks)."""
    found = []
    for source in sources:
        if not os.path.lexists(source):
            raise CopyError(f"gproc cp: {source}: no such file or directory")
        found.append(os.path.abspath(source))
    return found


def rcp_argv(source: str) -> list[str]:
    """The node's own tar, writing ``source`` (a file or a directory) to standard output."""
    path = posixpath.normpath(source)
    if not path.startswith("/") or path == "/":
        raise CopyError(f"gproc rcp: give the source as an absolute path other than /: {source}")
    return ["tar", "-C", posixpath.dirname(path), "-cf", "-", "--", posixpath.basename(path)]


class Gatherer(Printer):
    """Output of ``rcp``: each node's standard output is its tar stream, spooled to a file and
    unpacked into ``DEST/NAME.NODE`` once the node exits 0; its standard error is labelled as
    ``gproc e`` labels it."""

    def __init__(self, source: str, dest: str):
        super().__init__()
        self.name = posixpath.basename(posixpath.normpath(source))
        self.dest = Path(dest)
        self.spool = Path(tempfile.mkdtemp(prefix=".gproc-rcp-", dir=self.dest))
        self.parts: dict[str, object] = {}

    def output(self, node: str, fd: int, data: bytes) -> None:
        if fd == 2:
            super().output(node, fd, data)
            return
        part = self.parts.get(node)
        if part is None:
            part = self.parts[node] = open(self.spool / f"{node}.tar", "wb")  # noqa: SIM115
        part.write(data)  # type: ignore[attr-defined]

    def exited(self, node: str, status: int) -> None:
        part = self.parts.pop(node, None)
        if part is not None:
            part.close()  # type: ignore[attr-defined]
        if status == 0:
            status = self._unpack(node)
        super().exited(node, status)

    def _unpack(self, node: str) -> int:
        """``DEST/NAME.NODE`` from the node's tar stream; 1 (and why) when that fails."""
        target = self.dest / f"{self.name}.{node}"
        where = Path(tempfile.mkdtemp(prefix=f".{node}-", dir=self.spool))
        archive = self.spool / f"{node}.tar"
        done = subprocess.run(
            ["tar", "-C", str(where), "--no-same-owner", "-xf", str(archive)],
            capture_output=True,
            text=True,
        )
        try:
            if done.returncode != 0:
                raise OSError(done.stderr.strip() or f"tar exited {done.returncode}")
            if target.exists() and not target.is_symlink() and target.is_dir():
                shutil.rmtree(target)
            os.replace(where / self.name, target)
            self.err.write(f"{node}: {self.name} -> {target}\n".encode())
            return 0
        except OSError as e:
            self.err.write(f"gproc rcp: {node}: cannot unpack into {target}: {e}\n".encode())
            return 1
        finally:
            self.err.flush()
            shutil.rmtree(where, ignore_errors=True)
            archive.unlink(missing_ok=True)

    def finish(self) -> int:
        for part in self.parts.values():
            part.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.spool, ignore_errors=True)
        return super().finish()
