"""A node's cache of shipped files, by content hash, so a program's bytes cross the tree once.

People run the same binary again and again; its libc does not change between runs. Each
slave keeps the files it has received, named by their sha256, in a directory beside binRoot
(bounded in size, least recently used out first). When a job arrives, a node answers with the
files it does not hold, every hop passes the union up, and the client sends only those; each
hop then forwards a file only to the children that asked for it.

Every job gets its own copy of a cached file; no job ever holds a link to a blob. Jobs run as
root, so permissions do not keep a job from writing a file it was given, and a job that
rewrites its file in place and puts the mtime back was, with hard links, changing the blob and
so the bytes of every later job (and of any job running at the same time on the same inode,
which no check at hand-out time can catch). Measured per job on this machine's ext4
(``bench/bench_cache.py``, median of 40, ms to place and CPU ms of place plus removal):

    /bin/true + ld.so + libc (2.1 MB)   link 0.03 (unsafe), link + sha256 2.0 / 2.1,
                                        copy_file_range 1.3-2.3 / 1.4-2.5
    one 32 MiB file                     link 0.01 (unsafe), link + sha256 26 / 18,
                                        copy_file_range 8-12 / 9.6

A hash on reuse costs as much as a copy for a small closure and twice as much for a large
file, and is safe only for jobs that do not overlap; a stamp of (size, mtime_ns, ctime_ns,
ino) on a linked blob is useless because link() and unlink() of the job's own copies change
ctime, so it tripped on every reuse and fell back to the hash. A copy is the cheapest option
that is safe: it is made by the kernel (``FICLONE``, a reflink sharing the blocks until either
side writes, where the file system has them, as btrfs and XFS do; else ``copy_file_range``,
which on ext4 copies through the page cache), and the bytes that a job may change are its own.

A blob itself is written once, by us, in the cache directory (the receiving path spools a
shipped file there, checks its sha256, and copies the job's file out of it), and then only
read. So its (size, mtime_ns, ctime_ns, ino) stays what it was when it was stored, and a blob
changed behind our back (say by a root job writing into the cache directory; ctime cannot be
set back without moving the clock) is re-hashed before it is handed out, and dropped if its
bytes no longer match its name. A blob this daemon has not seen yet (after a restart) is
re-hashed on first use.

Thread safety: jobs unpack in worker threads and share one cache. A lock guards the
bookkeeping (the LRU index, the size, eviction); hashing and copying happen outside it, on a
file descriptor opened first, so a blob evicted meanwhile is still copied whole, and a blob
already gone makes :meth:`BlobCache.copy_out` return False (the file is shipped instead).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import queue
import re
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("gproc.cache")

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the source's blocks, copy on write
BLOCK = 1 << 20
# What FICLONE and copy_file_range say when the file systems cannot do it: try the next way.
_CANNOT = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_SPOOL = ".in-"  # prefix of files being received into the cache; never a blob's name
_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create(path: str, readable: bool = False) -> int:
    """A new file at ``path``, owner-only, never an existing one and never through a symlink."""
    return os.open(path, _CREATE | (os.O_RDWR if readable else os.O_WRONLY), 0o600)


Stamp = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, ino)


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class BlobCache:
    """The blobs under ``path``, at most ``limit`` bytes of them; safe to share between threads."""

    def __init__(self, path: Path, limit: int, spares: bool = True):
        self.path = str(path)  # plain strings: pathlib costs more than the syscalls here
        self.limit = limit
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._names = itertools.count()
        self._clone = True  # until FICLONE says this file system has no reflinks
        self._spares_on = spares  # until a spare cannot be linked where jobs are staged
        self._spares: dict[str, tuple[str, int, Stamp]] = {}  # blob -> (path, size, stamp)
        self._making: set[str] = set()  # blobs queued for a spare or having one made
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._maker: threading.Thread | None = None
        # blob path -> (size, stamp when this daemon last checked it, or None): oldest first
        self._index: OrderedDict[str, tuple[int, Stamp | None]] = OrderedDict()
        found = []
        with os.scandir(self.path) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False) and _BLOB_NAME.fullmatch(e.name):
                    st = e.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, e.path, st.st_size))
                else:  # a spool or spare a killed predecessor left, or nothing of ours
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
        for _, blob, size in sorted(found):
            self._index[blob] = (size, None)
        self.size = sum(size for size, _ in self._index.values())

    def _blob(self, digest: bytes) -> str:
        return os.path.join(self.path, digest.hex())

    # ---------------------------------------------------------------- handing out

    def copy_out(self, digest: bytes, dest: str, mode: int) -> bool:
        """Copy the cached blob to a new file ``dest`` with ``mode``; False when not cached.

        ``dest`` must not exist (it is created with O_EXCL, never through a symlink). False
        also when the blob has changed since it was stored (it is dropped) or is evicted
        before it could be opened; ``dest`` is then left absent. Other OSErrors (no space,
        say) are raised, with ``dest`` removed.
        """
        blob = self._blob(digest)
        if not self._take_spare(blob, dest, mode):
            try:
                src = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return False  # not cached, or evicted a moment ago
            try:
                st = os.fstat(src)
                if not self._intact(blob, src, st, digest):
                    return False
                dst = create(dest)
                try:
                    self.copy_fd(src, dst, st.st_size)
                    os.fchmod(dst, mode)
                except BaseException:
                    os.close(dst)
                    with contextlib.suppress(OSError):
                        os.unlink(dest)
                    raise
                os.close(dst)
            finally:
                os.close(src)
        with self._lock:
            if blob in self._index:
                self._index.move_to_end(blob)
        self._want_spare(blob)
        return True

    def _intact(self, blob: str, fd: int, st: os.stat_result, digest: bytes) -> bool:
        """The blob open on ``fd`` still holds the bytes of its name (re-hashed if in doubt)."""
        stamp = _stamp(st)
        with self._lock:
            known = self._index.get(blob)
        if known is not None and known[1] == stamp:
            return True
        if sha256_fd(fd) == digest:
            with self._lock:
                if blob in self._index:
                    self._index[blob] = (st.st_size, stamp)
            return True
        log.warning("cached %s changed since it was stored; dropping it", blob)
        with self._lock:
            self._drop(blob, st.st_ino)
        return False

    # ---------------------------------------------------------------- spares

    def _take_spare(self, blob: str, dest: str, mode: int) -> bool:
        """Put the blob's spare copy, if it has an unchanged one, at ``dest``; it is the job's."""
        with self._lock:
            spare = self._spares.pop(blob, None)
            if spare is None:
                return False
            path, size, stamp = spare
            self.size -= size
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if _stamp(st) != stamp:
                log.warning("spare copy %s changed since it was made; dropping it", path)
                return False
            os.fchmod(fd, mode)
            os.link(path, dest)  # never replaces, never follows a symlink at dest
            if os.lstat(dest).st_ino != st.st_ino:  # swapped in between: not ours to give
                os.unlink(dest)
                return False
            return True
        except OSError as e:
            if e.errno == errno.EXDEV:  # jobs are staged on another file system
                self._stop_spares()
            elif not os.path.lexists(dest):
                log.warning("cannot hand out the spare copy %s: %s", path, e)
            return False
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _want_spare(self, blob: str) -> None:
        """Have a copy of ``blob`` made for the next job, in a low-priority thread."""
        with self._lock:
            if (
                not self._spares_on
                or blob in self._spares
                or blob in self._making
                or blob not in self._index
            ):
                return
            self._making.add(blob)
            if self._maker is None:
                self._maker = threading.Thread(
                    target=self._make_spares, name="gproc-cache-spares", daemon=True
                )
                self._maker.start()
        self._queue.put(blob)

    def _make_spares(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # a thread's own nice on Linux
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (blob := self._queue.get()) is not None:
            try:
                self._make_spare(blob)
            except Exception as e:  # a spare is an optimisation: never kill the maker
                log.warning("cannot make a spare copy of %s: %s", blob, e)
            finally:
                with self._lock:
                    self._making.discard(blob)
                    if not self._making:
                        self._settled.notify_all()

    def _make_spare(self, blob: str) -> None:
        try:
            src = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # evicted meanwhile
        path: str | None = os.path.join(self.path, f".spare-{os.getpid()}-{next(self._names)}")
        assert path is not None
        dst = -1
        try:
            st = os.fstat(src)
            if not self._intact(blob, src, st, bytes.fromhex(os.path.basename(blob))):
                return
            dst = create(path)
            self.copy_fd(src, dst, st.st_size)
            spare = os.fstat(dst)
            with self._lock:
                if self._spares_on and blob in self._index and blob not in self._spares:
                    self._spares[blob] = (path, spare.st_size, _stamp(spare))
                    self.size += spare.st_size
                    path = None
                    if self.size > self.limit:
                        self._evict()
        finally:
            os.close(src)
            if dst >= 0:
                os.close(dst)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _stop_spares(self) -> None:
        with self._lock:
            self._spares_on = False
            spares, self._spares = self._spares, {}
            for path, size, _ in spares.values():
                self.size -= size
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no spare copy is being made (tests, benchmarks); False on timeout."""
        with self._lock:
            return self._settled.wait_for(lambda: not self._making, timeout)

    def close(self) -> None:
        """Stop the thread that makes spares (the process exiting stops it too)."""
        with self._lock:
            self._spares_on = False
        self._queue.put(None)

    # ---------------------------------------------------------------- taking in

    def spool(self, size: int) -> str | None:
        """A fresh name in the cache directory to receive a file of ``size`` bytes into.

        None when the file would not be kept (larger than the whole cache). The caller
        creates it, writes and checks the bytes, then calls :meth:`keep` or removes it.
        """
        if size > self.limit:
            return None
        return os.path.join(self.path, f"{_SPOOL}{os.getpid()}-{next(self._names)}")

    def keep(self, spool: str, fd: int, digest: bytes) -> None:
        """Make the spooled file (open on ``fd``, bytes checked against ``digest``) the blob.

        A blob of that name already there is replaced: these bytes were checked just now.
        Then the least recently used blobs go until the cache is within its limit.
        """
        os.fchmod(fd, 0o400)
        blob = self._blob(digest)
        with self._lock:
            os.replace(spool, blob)  # rename changes ctime: stamp after it
            st = os.fstat(fd)
            old = self._index.pop(blob, None)
            self.size += st.st_size - (old[0] if old else 0)
            self._index[blob] = (st.st_size, _stamp(st))
            if self.size > self.limit:
                self._evict()

    def add(self, src: str, digest: bytes) -> None:
        """Keep a copy of the file ``src`` if its bytes hash to ``digest``."""
        size = os.path.getsize(src)
        spool = self.spool(size)
        if spool is None:
            return
        dst = -1
        try:
            with open(src, "rb") as f:
                dst = create(spool, readable=True)
                self.copy_fd(f.fileno(), dst, size)
            if sha256_fd(dst) != digest:
                raise OSError(errno.EINVAL, "bytes do not match the sha256 given")
            self.keep(spool, dst, digest)
        except OSError as e:
            log.warning("cannot cache %s: %s", src, e)
            with contextlib.suppress(OSError):
                os.unlink(spool)
        finally:
            if dst >= 0:
                os.close(dst)

    # ---------------------------------------------------------------- bookkeeping

    def _evict(self) -> None:
        """Least recently used first, down to 3/4 of the limit (lock held)."""
        while self._index and self.size > self.limit * 3 // 4:
            self._drop(next(iter(self._index)))

    def _drop(self, blob: str, ino: int | None = None) -> None:
        """Forget and remove ``blob`` (only if it is still inode ``ino``) and its spare;
        lock held."""
        with contextlib.suppress(FileNotFoundError):
            if ino is None or os.stat(blob).st_ino == ino:
                os.unlink(blob)
        entry = self._index.pop(blob, None)
        if entry is not None:
            self.size -= entry[0]
        spare = self._spares.pop(blob, None)
        if spare is not None:
            self.size -= spare[1]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare[0])

    # ---------------------------------------------------------------- copying

    def copy_fd(self, src: int, dst: int, size: int) -> None:
        """Copy ``size`` bytes from offset 0 of ``src`` to ``dst``, the cheapest way there is.

        A reflink where the file system has them, else ``copy_file_range``, else reads and
        writes. Offsets are explicit, so ``src``'s file
        position does not matter. OSError if ``src`` has fewer than ``size`` bytes.
        """
        if size == 0:
            return
        if self._clone:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                if os.fstat(dst).st_size != size:
                    raise OSError(errno.EIO, f"reflink gave {os.fstat(dst).st_size} bytes")
                return
            except OSError as e:
                if e.errno not in _CANNOT:
                    raise
                self._clone = False  # the same file systems will say the same next time
        copy_fd(src, dst, size)


def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from offset 0 of ``src`` to the same offsets of ``dst``.

    ``copy_file_range`` (within one file system), else ``sendfile`` (across file systems, a
    tmpfs say), both in the kernel; else reads and writes.
    """
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, done, done)
        except OSError as e:
            if e.errno not in _CANNOT:
                raise
            break
        if n == 0:
            raise OSError(errno.EIO, f"source ended after {done} of {size} bytes")
        done += n
    if done < size:
        os.lseek(dst, done, os.SEEK_SET)
    while done < size:
        try:
            n = os.sendfile(dst, src, done, size - done)
        except OSError as e:
            if e.errno not in _CANNOT:
                raise
            break
        if n == 0:
            raise OSError(errno.EIO, f"source ended after {done} of {size} bytes")
        done += n
    while done < size:
        block = os.pread(src, min(BLOCK, size - done), done)
        if not block:
            raise OSError(errno.EIO, f"source ended after {done} of {size} bytes")
        os.lseek(dst, done, os.SEEK_SET)
        write_all(dst, block)
        done += len(block)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data``: os.write may write less; writing nothing is an error."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, f"write wrote nothing with {len(view)} bytes left")
        view = view[n:]


def sha256_fd(fd: int) -> bytes:
    """The sha256 of an open file from offset 0, read a MiB at a time (the GIL is let go)."""
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, BLOCK, offset):
        h.update(block)
        offset += len(block)
    return h.digest()


def sha256_file(path: str) -> bytes:
    """The sha256 of a file, read a MiB at a time."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)
