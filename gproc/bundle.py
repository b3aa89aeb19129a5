"""Bundles: the files of a job, packed on the front-end and unpacked, after checks, on a node.

A bundle is a manifest (path, kind, mode, size, sha256, symlink target) followed by the bytes
of its regular files, concatenated in manifest order and cut into chunks. Paths are relative to
the node's binRoot. The sender is trusted to be of this cluster (the key says so) but not to be
careful, so the receiver treats a manifest as hostile until checked: no absolute paths, no
``..``, no symlink that points outside the root or that another entry would be written
through, no device or special files, and sizes and hashes that match the bytes that arrive.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gproc.cache import BlobCache, create, write_all
from gproc.digest import FileDigest, digest_file
from gproc.errors import GprocError, warn
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
    sha256: bytes = b""  # the file's digest: the sha256 of its chunks' sha256s (gproc.digest)
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

    def add_entries(self, entries: Iterable[Entry]) -> None:
        """Entries packed before, in their order (a cached closure, see gproc.closures)."""
        for entry in entries:
            self._put(entry)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(Entry(_relative(os.path.abspath(path)), "d", stat.S_IMODE(mode) or 0o755))

    def _add_file(self, rel: str, host: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{host} is not a regular file, directory or symlink; cannot ship it")
        self._put(
            Entry(rel, "f", stat.S_IMODE(st.st_mode), st.st_size, digest_file(host), src=host)
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


MAX_LINKS = 40  # as Linux: a chain longer than this does not resolve (ELOOP)


class Unpacker:
    """Writes a checked manifest under ``root``: cached files at once, the rest as they arrive.

    ``root`` may already hold files of earlier jobs (``-p=false``), so the bundle is checked
    against what is there before anything is created: every entry's directory resolves inside
    ``root`` (a symlink an earlier job left there is followed, never out), no entry is written
    through another entry's symlink, and every symlink chain, made of the manifest's links and
    those already in ``root``, is resolved in memory and must end inside ``root``.

    In a root that was there already, files are written to temporary names
    (``<path>.gproc-<tag>``) and renamed into place, and the symlinks made, only when every
    file has arrived and matched its sha256; a binary another job runs is never rewritten in
    place. In a root made for this bundle (a job's staging) files are written in place and the
    symlinks made at the end. A bundle refused at any step (a check, a hash, a short bundle,
    :meth:`abort` before it is complete) leaves nothing it created behind: its files and the
    directories it made are removed. Once complete it is kept.

    Bytes arrive file by file, in manifest order, for the files in :attr:`needed` only.

    Disk work happens in the constructor (directories, cached copies), :meth:`feed` and
    :meth:`abort`, all blocking: call them from a worker thread, one call at a time per
    unpacker. Unpackers of different jobs may run in different threads at once and share one
    :class:`BlobCache`.
    """

    def __init__(
        self,
        root: Path,
        entries: list[Entry],
        tag: str,
        cache: BlobCache | None = None,
        root_mode: int = 0o755,
    ):
        self.root = root
        self.root_mode = root_mode  # of ``root`` when made here: a job's staging is 0700
        self.tag = tag
        self.entries = entries
        self.cache = cache
        self.current: _Incoming | None = None
        self.made: dict[str, None] = {}  # directories created here, parents first
        self.staged: list[tuple[str, str]] = []  # (temporary, final) host paths of files
        self.placed: list[str] = []  # host paths renamed into place while committing
        self.ready: set[str] = set()  # host directories made and checked
        self.state = "open"  # then "done" (everything in place) or "refused" (nothing left)
        self.needed: list[int] = []
        self.pos = 0
        try:
            self._prepare()
            if self.complete:
                self._commit()
        except BaseException:
            self._roll_back()
            raise

    @property
    def complete(self) -> bool:
        return self.pos >= len(self.needed)

    def feed(self, index: int, data: bytes | memoryview, digest: bytes | None = None) -> None:
        """Bytes of manifest entry ``index``; a file's frames come in order, files in order.

        ``digest``, when given, is the sha256 of ``data``, already checked (a data frame's):
        a whole chunk that comes with it is not hashed again. BundleError (or OSError)
        refuses the bundle: nothing of it is left.
        """
        if self.state != "open" or self.complete or self.needed[self.pos] != index:
            raise BundleError(f"bytes for manifest entry {index} arrived out of turn")
        try:
            entry = self.entries[index]
            if self.current is None:
                host = self.hosts[index]
                tmp = self._tmp(host)
                self.staged.append((tmp, host))
                self.current = _Incoming(tmp, entry, self.cache, clear=not self.fresh)
            if self.current.write(memoryview(data), digest) < len(data):
                raise BundleError(f"{entry.path}: more bytes arrived than its {entry.size}")
            if self.current.left == 0:
                self.current.finish()
                self.current = None
                self.pos += 1
                if self.complete:
                    self._commit()
        except BaseException:
            self._roll_back()
            raise

    def abort(self) -> None:
        """Give up on an incomplete bundle: remove all it created. Nothing to do once complete."""
        if self.state == "open":
            self._roll_back()

    # ---------------------------------------------------------------- before anything exists

    def _prepare(self) -> None:
        self.fresh = not os.path.lexists(self.root)  # nothing under it to check against
        self._make_dirs(os.path.abspath(self.root))
        self.real_root = os.path.realpath(self.root)
        self.parents: dict[str, str] = {}  # manifest directory -> its host path
        self.hosts = [self._place(e) for e in self.entries]
        links = {
            self.hosts[i]: e.link for i, e in enumerate(self.entries) if e.kind == "l"
        }  # host path -> target, for the links this bundle will make
        self._check_places(links)
        plain = {self.hosts[i] for i, e in enumerate(self.entries) if e.kind == "f"}
        for i, e in enumerate(self.entries):
            if e.kind == "l":
                start = os.path.dirname(self.hosts[i])
                self._inside(e.path, self._resolve(start, e.link, links, plain, e))
        # Checked: now create directories, then the files that need no bytes.
        self.chmods: list[tuple[str, int]] = []  # directories that were there: at commit
        for i, e in enumerate(self.entries):
            host = self.hosts[i]
            if e.kind == "d":
                if e.path != ".":
                    self._ensure_dir(e.path, host)
                    if host in self.made:
                        os.chmod(host, e.mode | 0o700)
                    else:
                        self.chmods.append((host, e.mode | 0o700))
            else:
                self._ensure_dir(e.path, os.path.dirname(host))
        self.needed = [
            i for i, e in enumerate(self.entries) if e.kind == "f" and not self._early(i, e)
        ]

    def _place(self, e: Entry) -> str:
        """The host path of entry ``e``: its directory resolved on disk, checked to be inside.

        A directory entry is resolved itself (a symlink an earlier job left at its name is
        followed); a file or symlink replaces whatever is at its name.
        """
        if e.kind == "d":
            return self._dir_host(e.path)
        parent = self._dir_host(posixpath.dirname(e.path))
        return os.path.join(parent, posixpath.basename(e.path))

    def _dir_host(self, path: str) -> str:
        """Host path of manifest directory ``path``, without creating anything.

        The deepest part that exists already is resolved and must be inside the root; the
        rest will be made as plain directories.
        """
        if path in ("", "."):
            return self.real_root
        real = self.parents.get(path)
        if real is None:
            target = os.path.join(self.real_root, path)
            if self.fresh:
                real = target
            else:
                probe = target
                while not os.path.lexists(probe):
                    probe = os.path.dirname(probe)
                real = self._inside(path, os.path.realpath(probe))
                if probe != target:
                    real = os.path.join(real, os.path.relpath(target, probe))
            self.parents[path] = real
        return real

    def _check_places(self, links: dict[str, str]) -> None:
        """No two entries at one place, nothing under a file or link of the bundle."""
        leaves: dict[str, Entry] = {}  # host path -> the file or link entry going there
        for i, e in enumerate(self.entries):
            if e.kind != "d":
                if self.hosts[i] in leaves:
                    raise BundleError(
                        f"{e.path} and {leaves[self.hosts[i]].path} are the same file in the root"
                    )
                leaves[self.hosts[i]] = e
        if not leaves:
            return
        for i, e in enumerate(self.entries):
            host = self.hosts[i]
            up = host if e.kind == "d" else os.path.dirname(host)
            while len(up) > len(self.real_root):
                if up in leaves:
                    what = "symlink" if up in links else "file"
                    raise BundleError(
                        f"{e.path} would be written through the {what} {leaves[up].path}"
                    )
                up = os.path.dirname(up)
            if e.kind != "d" and not self.fresh and _is_dir(host):
                raise BundleError(f"{e.path}: a directory is in its place in the root")

    def _resolve(
        self, start: str, link: str, links: dict[str, str], plain: set[str], e: Entry
    ) -> str:
        """Where ``link``, read in directory ``start``, leads once this bundle is in place.

        As realpath does, but a name this bundle will make a link is followed to the bundle's
        target, a name it will make a file is not followed at all, and a name it will make a
        directory or that does not exist is taken as it is.
        """
        cur, parts, hops = start, link.split("/")[::-1], 0
        while parts:
            name = parts.pop()
            if name in ("", "."):
                continue
            if name == "..":
                cur = os.path.dirname(cur)
                continue
            nxt = os.path.join(cur, name)
            target = links.get(nxt)
            if target is None and nxt not in plain and not (self.fresh and self._under(nxt)):
                try:
                    target = os.readlink(nxt)
                except OSError:  # not a link, or not there: a plain name
                    pass
            if target is None:
                cur = nxt
                continue
            hops += 1
            if hops > MAX_LINKS:
                raise BundleError(f"symlink {e.path} -> {e.link}: too many levels of links")
            if target.startswith("/"):
                cur = "/"
            parts.extend(target.split("/")[::-1])
        return cur

    def _under(self, host: str) -> bool:
        return host.startswith(self.real_root + "/")

    def _inside(self, path: str, real: str) -> str:
        if real != self.real_root and not self._under(real):
            raise BundleError(f"{path}: resolves to {real}, outside the root")
        return real

    # ---------------------------------------------------------------- creating, undoing

    def _make_dirs(self, host: str) -> None:
        """Create ``host`` and any missing parents, noting each one made for the roll-back."""
        missing = []
        while not os.path.isdir(host):
            missing.append(host)
            host = os.path.dirname(host)
        top = os.path.abspath(self.root)
        for d in reversed(missing):
            try:
                os.mkdir(d, self.root_mode if d == top else 0o755)
            except FileExistsError:
                if not _is_dir(d):
                    raise
                continue  # another job's unpacker (-p=false) made it a moment ago: not ours
            self.made[d] = None

    def _ensure_dir(self, path: str, host: str) -> None:
        if host in self.ready:
            return
        self._make_dirs(host)
        if not self.fresh:  # nobody swapped a part of it for a symlink meanwhile
            self._inside(path, os.path.realpath(host))
        self.ready.add(host)

    def _early(self, i: int, e: Entry) -> bool:
        """Write an empty or cached file now; False when its bytes must be shipped."""
        if e.size and self.cache is None:
            return False
        host = self.hosts[i]
        tmp = self._tmp(host)
        if not self.fresh:
            _clear(tmp)
        if e.size == 0:
            self.staged.append((tmp, host))
            fd = create(tmp)
            try:
                os.fchmod(fd, e.mode & 0o1777)
            finally:
                os.close(fd)
            return True
        assert self.cache is not None
        if not self.cache.copy_out(e.sha256, tmp, e.mode & 0o1777):
            return False
        self.staged.append((tmp, host))
        return True

    def _tmp(self, host: str) -> str:
        """Where a file is written before the bundle is complete: in a root made for this
        bundle, its own place (nobody else's file is there to keep; a refusal removes it)."""
        return host if self.fresh else f"{host}.gproc-{self.tag}"

    def _commit(self) -> None:
        """Every file arrived and matched: rename the files into place, make the links."""
        for tmp, host in self.staged:
            if tmp != host:
                os.replace(tmp, host)
            self.placed.append(host)
        self.staged = []
        for i, e in enumerate(self.entries):
            if e.kind == "l":
                host = self.hosts[i]
                tmp = f"{host}.gproc-{self.tag}"
                _clear(tmp)
                self.staged.append((tmp, host))
                os.symlink(e.link, tmp)
                os.replace(tmp, host)
                self.staged.pop()
                self.placed.append(host)
        for host, mode in self.chmods:
            os.chmod(host, mode)
        self.state = "done"
        self.staged, self.placed, self.made = [], [], {}

    def _roll_back(self) -> None:
        """Remove every file, link and directory this bundle created; it is refused."""
        self.state = "refused"
        if self.current is not None:
            self.current.discard()
            self.current = None
        for path in self.placed + [tmp for tmp, _ in self.staged]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for d in reversed(self.made):
            with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                os.rmdir(d)
        self.staged, self.placed, self.made = [], [], {}


def _is_dir(path: str) -> bool:
    """A directory itself, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _clear(tmp: str) -> None:
    """Remove a stale temporary file (of a killed predecessor) so O_EXCL can create it anew."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


class _Incoming:
    """One regular file being received: checked against its digest as the bytes are written.

    When the cache admits the file (:meth:`BlobCache.admits`: a small file, or a large one
    that arrived here before), the bytes go to a spool file in the cache directory (never
    seen by a job), which becomes the blob once checked, and the job's file at ``tmp`` is a
    copy of it. Otherwise (no cache, the first arrival of a file over
    :data:`gproc.cache.ADMIT_BYTES`, a file larger than the cache) they go straight to
    ``tmp``: one write, no copy. That copy costs about 24 ms of CPU per node for a 32 MiB
    file on a tmpfs (gproc.cache), paid for nothing by a file shipped once; a large file whose bytes
    matched without being admitted is only noted by the cache (:meth:`BlobCache.saw`), so
    its next arrival is cached.
    """

    def __init__(self, tmp: str, entry: Entry, cache: BlobCache | None, clear: bool = True):
        self.tmp = tmp
        self.entry = entry
        self.cache = cache
        self.left = entry.size
        self.hash = FileDigest()
        if clear:
            _clear(tmp)
        self.spool: str | None = None
        if cache is not None and cache.admits(entry.size, entry.sha256):
            self.spool = cache.spool(entry.size)
        self.fd = create(self.spool or tmp, readable=self.spool is not None)

    def write(self, view: memoryview, digest: bytes | None = None) -> int:
        """Write what fits of ``view``; the count written (less than given: too many bytes)."""
        part = view[: self.left]
        try:
            self.hash.add(part, digest if len(part) == len(view) else None)
        except ValueError as e:  # chunks cut where the digest's are not: it cannot match
            raise BundleError(f"{self.entry.path}: {e}; bytes refused") from None
        write_all(self.fd, part)
        self.left -= len(part)
        return len(part)

    def finish(self) -> None:
        if self.hash.digest() != self.entry.sha256:
            self.discard()
            raise BundleError(f"{self.entry.path}: bytes do not match the manifest's sha256 digest")
        mode = self.entry.mode & 0o1777
        if self.spool is None:
            os.fchmod(self.fd, mode)
            if self.cache is not None:  # the bytes matched the digest: it may note it now
                self.cache.saw(self.entry.size, self.entry.sha256)
        else:
            assert self.cache is not None
            try:
                self.cache.keep(self.spool, self.fd, self.entry.sha256)
                self.spool = None
            except OSError as e:
                warn("gproc.bundle", "cannot cache %s: %s", self.entry.path, e)
            dst = create(self.tmp)
            try:
                self.cache.copy_fd(self.fd, dst, self.entry.size)
                os.fchmod(dst, mode)
            finally:
                os.close(dst)
            self.discard_spool()
        os.close(self.fd)
        self.fd = -1

    def discard_spool(self) -> None:
        if self.spool is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool)
            self.spool = None

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.discard_spool()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
