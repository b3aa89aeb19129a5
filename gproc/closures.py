"""The client's cache of packed programs, so a repeat ``gproc e`` neither parses ELF nor hashes.

Packing a program is the client's own cost of a launch: importing pyelftools, reading the
ELF headers of the program and of every library it may load (and of the candidates it does
not), reading ld.so.conf and nsswitch.conf, and hashing every file shipped (3.6 MB for
``/bin/true``). The answer depends only on the files and directories looked at, so while
recording it (gproc.elf.recording) every path is noted with its lstat stamp (device, inode,
mode, size, mtime, ctime; a path that was absent as absent), and the files hashed with the
stamp taken before their bytes were read. A later run with the same program, root, ``-L``
and ``-skipMissing`` takes the answer only when every one of those paths stamps the same:
a library, link, directory entry or configuration file that changed (ctime cannot be set
back) makes it a miss, and the answer is worked out again.

The cache is one file per user (``$XDG_CACHE_HOME/gproc/closures``, default under
``~/.cache``). What it says is shipped and, by its hashes, may be taken from the nodes'
caches, so a file another user could have written is never believed: it must be a regular
file of this user's, not a symlink, writable by nobody else, in a directory (and that
directory's parent) only this user or root may change. Anything else, or anything it does
not parse to, is ignored (and replaced when this user may write there).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from gproc import elf
from gproc.bundle import Entry, Packer

VERSION = 2  # 2: file digests as gproc.digest defines them (protocol 3)
KEEP = 64  # programs remembered, the most recently packed
MAX_BYTES = 8 << 20  # a larger cache file is not read
_FIELDS = 7  # of an entry: path, kind, mode, size, sha256, link, source
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Packed:
    """A packed ELF program: what the job header says about it, and its files."""

    interp: str
    libdirs: list[str]
    argv0: bool
    entries: list[Entry]


class _Recording(Packer):
    """A packer that notes each file's stamp before hashing it (its bytes are read then)."""

    def __init__(self, seen: dict[str, elf.Stamp | None]):
        super().__init__()
        self.seen = seen

    def _add_file(self, rel: str, host: str, st: os.stat_result) -> None:
        self.seen.setdefault(
            host, (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        )
        super()._add_file(rel, host, st)


def pack(
    prog: str, root: str, libpath: list[str], skip_missing: bool, path: str | None = None
) -> Packed | None:
    """The packed closure of ``prog`` (from the cache when still true); None when ``prog``
    is not ELF (it is shipped as it is). ``path``: the cache file (default per user)."""
    path = cache_file() if path is None else path
    key = hashlib.sha256(msgpack.packb([prog, root, libpath, skip_missing])).hexdigest()
    programs = load(path) if path else {}
    cached = _packed(programs.get(key))
    if cached is not None:
        return cached
    with elf.recording() as seen:
        if not elf.is_elf(elf.resolve_in_root(root, prog)):
            return None
        found = elf.closure(prog, root, libpath, skip_missing)
        packer = _Recording(seen)
        for obj in found.objects:
            packer.add_object(root, obj)
        argv0 = elf.loader_takes_argv0(root, found.interp)
    packed = Packed(found.interp or "", list(found.libdirs), argv0, list(packer.entries.values()))
    if path:
        programs[key] = _record(packed, seen)
        _save(path, programs)
    return packed


def cache_file() -> str | None:
    """This user's cache file; None without a home to keep it in."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gproc", "closures") if os.path.isabs(base) else None


def _packed(record: Any) -> Packed | None:
    """A cached answer whose every stamp still holds; None otherwise (or when malformed)."""
    try:
        if not all(elf.stamp(p) == (tuple(s) if s else None) for p, s in record["seen"]):
            return None
        entries = [Entry(*fields) for fields in record["entries"]]
        if not all(len(fields) == _FIELDS for fields in record["entries"]):
            return None
        interp, libdirs, argv0 = record["interp"], record["libdirs"], record["argv0"]
        return Packed(str(interp), [str(d) for d in libdirs], bool(argv0), entries)
    except (TypeError, ValueError, KeyError):
        return None


def _fields(e: Entry) -> list[Any]:
    return [e.path, e.kind, e.mode, e.size, e.sha256, e.link, e.src]


def _record(packed: Packed, seen: dict[str, elf.Stamp | None]) -> dict[str, Any]:
    return {
        "seen": [[p, list(s) if s else None] for p, s in seen.items()],
        "interp": packed.interp,
        "libdirs": packed.libdirs,
        "argv0": packed.argv0,
        "entries": [_fields(e) for e in packed.entries],
        "at": time.time(),
    }


# ---------------------------------------------------------------- the file


def load(path: str) -> dict[str, Any]:
    """The programs of a cache file this user alone may have written; {} for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not (_private(os.fstat(fd), stat.S_ISREG) and _safe_dirs(path)):
            return {}
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return {}
    try:
        body = msgpack.unpackb(data)
    except Exception:  # whatever garbage the file holds, it is only a miss
        return {}
    if not isinstance(body, dict) or body.get("v") != VERSION:
        return {}
    programs = body.get("programs")
    return programs if isinstance(programs, dict) else {}


def _save(path: str, programs: dict[str, Any]) -> None:
    """Write the newest ``KEEP`` programs under a fresh name, then rename it into place."""
    newest = sorted(programs.items(), key=lambda kv: _when(kv[1]))[-KEEP:]
    body = msgpack.packb({"v": VERSION, "programs": dict(newest)})
    directory = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _safe_dirs(path):
            return
        fd = os.open(tmp, _NEW, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _when(record: Any) -> float:
    try:
        return float(record["at"])
    except (TypeError, ValueError, KeyError):
        return 0.0


def _private(st: os.stat_result, kind: Any) -> bool:
    """Of that kind, this user's, and writable by nobody else."""
    return bool(kind(st.st_mode)) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _safe_dirs(path: str) -> bool:
    """The cache's directory is this user's alone; its parent is this user's or root's and
    writable by nobody else unless sticky, so nobody else can swap the directory either."""
    directory = os.path.dirname(path)
    try:
        mine = os.lstat(directory)
        parent = os.lstat(os.path.dirname(directory))
    except OSError:
        return False
    open_to_others = parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX
    return (
        _private(mine, stat.S_ISDIR)
        and stat.S_ISDIR(parent.st_mode)
        and parent.st_uid in (0, os.geteuid())
        and not open_to_others
    )
