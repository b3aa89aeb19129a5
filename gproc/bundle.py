"""Bundles: the files of a job, packed on the front-end and unpacked, after checks, on a node.

A bundle is a manifest (path, kind, mode, size, sha256, symlink target) followed by the bytes
of its regular files, concatenated in manifest order and cut into chunks. Paths are relative to
the node's binRoot. The sender is trusted to be of this cluster (the key says so) but not to be
careful, so the receiver treats a manifest as hostile until checked: no absolute paths, no
``..``, no symlink that points outside the root or that another entry would be written
through, no device or special files, and sizes and hashes that match the bytes that arrive.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gproc.cache import BlobCache, sha256_file
from gproc.errors import GprocError
from gproc.protocol import CHUNK

KINDS = ("f", "d", "l")


class BundleError(GprocError):
    """A manifest or its bytes failed a check; nothing of the job is kept."""


@dataclass
class Entry:
    """One file, directory or symlink of a bundle."""

    path: str
    kind: str
    mode: int = 0o755
    size: int = 0
    sha256: bytes = b""
    link: str = ""
    src: str = field(default="", repr=False)  # host path on the sender; never sent

    def wire(self) -> dict[str, Any]:
        return {
            "p": self.path,
            "k": self.kind,
            "m": self.mode,
            "s": self.size,
            "h": self.sha256,
            "l": self.link,
        }


# ---------------------------------------------------------------- packing (front-end)


class Packer:
    """Collects entries; symlink chains are kept, parent directories become plain ones."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.walked: set[str] = set()  # directories added, against symlink loops

    def add_object(self, root: str, path: str) -> None:
        """Add root-relative absolute ``path`` of tree ``root``, following its symlink chain.

        The chain's links travel as links (targets made relative), and what it ends at as a
        file, or, for ``-f`` (root "/"), as a whole directory.
        """
        from gproc.elf import resolve_in_root

        seen: set[str] = set()
        while path not in seen:
            seen.add(path)
            rel = _relative(path)
            host = os.path.join(
                resolve_in_root(root, posixpath.dirname(path) or "/"), posixpath.basename(path)
            )
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                raise BundleError(f"{path} does not exist (a broken symlink?)") from None
            if stat.S_ISDIR(st.st_mode) and root == "/":
                self.add_host_path(host)
                return
            if not stat.S_ISLNK(st.st_mode):
                self._add_file(rel, host, st)
                return
            target = os.readlink(host)
            absolute = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            link = posixpath.relpath(absolute, posixpath.dirname(path))
            self._put(Entry(rel, "l", 0o777, link=link))
            path = absolute

    def add_host_path(self, path: str) -> None:
        """Add a front-end file or directory (``-f``) at the same absolute path, recursively.

        Symlinks inside travel as symlinks, together with what they point to.
        """
        path = os.path.abspath(path)
        if path in self.walked:
            return
        self.walked.add(path)
        if not os.path.isdir(path) or os.path.islink(path):
            self.add_object("/", path)
            return
        self.add_dir(path, os.stat(path).st_mode)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in dirnames + sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full) or not os.path.isdir(full):
                    self.add_object("/", full)
                else:
                    self.add_dir(full, os.stat(full).st_mode)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(Entry(_relative(os.path.abspath(path)), "d", stat.S_IMODE(mode) or 0o755))

    def _add_file(self, rel: str, host: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{host} is not a regular file, directory or symlink; cannot ship it")
        self._put(
            Entry(rel, "f", stat.S_IMODE(st.st_mode), st.st_size, sha256_file(host), src=host)
        )

    def _put(self, entry: Entry) -> None:
        self.entries.setdefault(entry.path, entry)

    def manifest(self) -> list[Entry]:
        """Directories first (shallow to deep), then everything else in insertion order."""
        dirs = sorted(
            (e for e in self.entries.values() if e.kind == "d"), key=lambda e: e.path.count("/")
        )
        return dirs + [e for e in self.entries.values() if e.kind != "d"]


def _relative(path: str) -> str:
    rel = posixpath.normpath(path).lstrip("/")
    return rel or "."


def total_size(manifest: Iterable[Entry]) -> int:
    return sum(e.size for e in manifest if e.kind == "f")


def chunks(manifest: list[Entry], needed: Iterable[int]) -> Iterator[tuple[int, bytes]]:
    """(manifest index, bytes) of the needed files, in order, at most CHUNK bytes at a time."""
    for i in sorted(needed):
        e = manifest[i]
        with open(e.src, "rb") as f:
            left = e.size
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise BundleError(f"{e.src} shrank while it was being sent")
                left -= len(block)
                yield i, block


# ---------------------------------------------------------------- checking (node)


def check_manifest(raw: Any, total: Any) -> list[Entry]:
    """Entries of a received manifest, or BundleError naming the first bad one."""
    if not isinstance(raw, list) or not isinstance(total, int) or total < 0:
        raise BundleError("manifest is not a list with a total size")
    entries = [_check_entry(item) for item in raw]
    paths = {e.path for e in entries}
    if len(paths) != len(entries):
        raise BundleError("manifest names a path twice")
    links = {e.path for e in entries if e.kind == "l"}
    for e in entries:
        _check_not_through_link(e.path, links)
        if e.kind == "l":
            _check_link(e)
    if sum(e.size for e in entries if e.kind == "f") != total:
        raise BundleError(
            f"file sizes add up to {sum(e.size for e in entries)}, not the announced {total} bytes"
        )
    return entries


def _check_entry(item: Any) -> Entry:
    if not isinstance(item, dict):
        raise BundleError("manifest entry is not a map")
    path, kind, mode = item.get("p"), item.get("k"), item.get("m")
    size, digest, link = item.get("s", 0), item.get("h", b""), item.get("l", "")
    if not isinstance(path, str) or not path or "\0" in path:
        raise BundleError(f"bad path {path!r} in manifest")
    if kind not in KINDS:
        raise BundleError(
            f"{path}: kind {kind!r} is not a file, directory or symlink "
            "(device and special files are refused)"
        )
    if not isinstance(mode, int) or mode & ~0o7777:
        raise BundleError(f"{path}: mode {mode!r} is not plain permission bits")
    if not isinstance(size, int) or size < 0 or (kind != "f" and size):
        raise BundleError(f"{path}: bad size {size!r}")
    if not isinstance(digest, bytes) or (kind == "f" and len(digest) != 32):
        raise BundleError(f"{path}: bad sha256")
    if not isinstance(link, str) or (kind == "l") != bool(link) or "\0" in link:
        raise BundleError(f"{path}: bad symlink target {link!r}")
    return Entry(_check_path(path), kind, mode & 0o1777, size, digest, link)


def _check_path(path: str) -> str:
    if path.startswith("/"):
        raise BundleError(f"absolute path {path!r} in manifest")
    parts = path.split("/")
    if ".." in parts:
        raise BundleError(f"path {path!r} climbs out of the root with '..'")
    norm = posixpath.normpath(path)
    if norm == "." and path != ".":
        raise BundleError(f"path {path!r} names the root itself")
    return norm


def _check_not_through_link(path: str, links: set[str]) -> None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise BundleError(f"{path} would be written through the symlink {'/'.join(parts[:i])}")


def _check_link(e: Entry) -> None:
    if e.link.startswith("/"):
        raise BundleError(f"symlink {e.path} -> {e.link} points outside the root")
    target = posixpath.normpath(posixpath.join(posixpath.dirname(e.path), e.link))
    if target == ".." or target.startswith("../"):
        raise BundleError(f"symlink {e.path} -> {e.link} points outside the root")


# ---------------------------------------------------------------- unpacking (node)


class Unpacker:
    """Writes a checked manifest under ``root``: cached files at once, the rest as they arrive.

    ``root`` may already hold files of earlier jobs (``-p=false``); files are written to a
    temporary name and renamed into place so a binary another job runs is never rewritten in
    place, and every directory on the way is checked to resolve inside ``root``. Bytes arrive
    file by file, in manifest order, for the files in :attr:`needed` only.
    """

    def __init__(self, root: Path, entries: list[Entry], tag: str, cache: BlobCache | None = None):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.tag = tag
        self.entries = entries
        self.cache = cache
        self.current: _Incoming | None = None
        self.dirs: dict[str, str] = {}  # checked directories: manifest path -> host path
        root.mkdir(parents=True, exist_ok=True)
        for e in entries:
            if e.kind == "d":
                self._dir(e.path, e.mode)
        links = [e for e in entries if e.kind == "l"]
        for e in links:
            self._symlink(e)
        for e in links:  # each link is inside on its own; a chain of them may not be
            self._inside(e.path, os.path.realpath(os.path.join(self.root, e.path)))
        self.needed = [i for i, e in enumerate(entries) if e.kind == "f" and not self._early(e)]
        self.pos = 0

    @property
    def complete(self) -> bool:
        return self.pos >= len(self.needed)

    def feed(self, index: int, data: bytes) -> None:
        """Bytes of manifest entry ``index``; a file's frames come in order, files in order."""
        if self.complete or self.needed[self.pos] != index:
            raise BundleError(f"bytes for manifest entry {index} arrived out of turn")
        entry = self.entries[index]
        if self.current is None:
            self.current = _Incoming(self._host(entry.path), entry, self.tag)
        if self.current.write(memoryview(data)) < len(data):
            raise BundleError(f"{entry.path}: more bytes arrived than its {entry.size}")
        if self.current.left == 0:
            self.current.finish()
            if self.cache is not None:
                self.cache.add(self.current.host, entry.sha256)
            self.current = None
            self.pos += 1

    def abort(self) -> None:
        if self.current is not None:
            self.current.discard()
            self.current = None

    def _early(self, e: Entry) -> bool:
        """Write an empty or cached file now; False when its bytes must be shipped."""
        host = self._host(e.path)
        if e.size == 0:
            _Incoming(host, e, self.tag).finish()
            return True
        if self.cache is None:
            return False
        tmp = f"{host}.gproc-{self.tag}"
        if not self.cache.copy_out(e.sha256, tmp, e.mode & 0o1777):
            return False
        os.replace(tmp, host)
        return True

    def _host(self, path: str) -> str:
        """Host path for ``path``, after making sure its directory is inside the root.

        The deepest directory that exists already is checked before anything is created, so
        a symlink left in binRoot cannot make us create directories elsewhere.
        """
        parent = posixpath.dirname(path)
        real = self.dirs.get(parent)
        if real is None:
            target = os.path.join(self.root, parent)
            probe = target
            while not os.path.lexists(probe):
                probe = os.path.dirname(probe)
            self._inside(path, os.path.realpath(probe))
            os.makedirs(target, exist_ok=True)
            real = self._inside(path, os.path.realpath(target))
            self.dirs[parent] = real
        return os.path.join(real, posixpath.basename(path))

    def _inside(self, path: str, real: str) -> str:
        if real != self.real_root and not real.startswith(self.real_root + "/"):
            raise BundleError(f"{path}: resolves to {real}, outside the root")
        return real

    def _dir(self, path: str, mode: int) -> None:
        if path == ".":
            return
        host = self._host(path + "/.")
        os.makedirs(host, exist_ok=True)
        os.chmod(host, mode | 0o700)

    def _symlink(self, e: Entry) -> None:
        host = self._host(e.path)
        tmp = f"{host}.gproc-{self.tag}"
        os.symlink(e.link, tmp)
        os.replace(tmp, host)


class _Incoming:
    """One regular file being received: written to a temporary name, checked, renamed."""

    def __init__(self, host: str, entry: Entry, tag: str):
        self.host = host
        self.entry = entry
        self.left = entry.size
        self.tmp = f"{host}.gproc-{tag}"
        self.hash = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.tmp, flags, 0o600)

    def write(self, view: memoryview) -> int:
        part = view[: self.left]
        self.hash.update(part)
        os.write(self.fd, part)
        self.left -= len(part)
        return len(part)

    def finish(self) -> None:
        os.fchmod(self.fd, self.entry.mode & 0o1777)
        os.close(self.fd)
        self.fd = -1
        if self.hash.digest() != self.entry.sha256:
            os.unlink(self.tmp)
            raise BundleError(f"{self.entry.path}: bytes do not match the manifest's sha256")
        os.replace(self.tmp, self.host)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
