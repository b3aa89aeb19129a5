"""A node's cache of shipped files, by content hash, so a program's bytes cross the tree once.

People run the same binary again and again; its libc does not change between runs. Each
slave keeps the files it has received, named by their digest (gproc.digest), in a directory
beside binRoot (bounded in size, least recently used out first). When a job arrives, a node
answers with the files it does not hold, every hop passes the union up, and the client sends
only those; each hop then forwards a file only to the children that asked for it.

Every job gets its own copy of a cached file, or (gproc.trees) a shared tree of copies under
an overlay that takes its writes; no job ever holds a link to a blob. Jobs run as
root, so permissions do not keep a job from writing a file it was given, and a job that
rewrote its file in place and put the mtime back was, with hard links, changing the blob and
so the bytes of every later job (and of any job running at the same time on the same inode,
which no check at hand-out time can catch). Measured per job on this machine's ext4, no
reflinks (``bench/bench_cache.py``, median of 40-60 jobs; the range is over seven runs on a
machine shared with other work; ms on the launch path / CPU ms including the removal):

    option            /bin/true + ld.so + libc (2.1 MB)       one 32 MiB file
    link (unsafe)     0.02-0.03 / 0.1                         0.02 / 0.1
    link + stamp      2.0-2.7 / 2.1-2.8 (the stamp always     25-29 / 19-25
                      trips: link() and unlink() move ctime)
    link + sha256     1.9-2.6 / 2.0-2.6 (unsafe: jobs overlap) 25-95 / 19-25
    copy_file_range   0.7-4.6 / 0.9-4.8, mostly 0.7 / 0.9     12-41 / 10-15

A hash on reuse is not safe (a job still running shares the inode with the next one) and
costs more than a copy, except for small files on a machine busy with other I/O, where
creating the copy's inode waits on the journal. So a copy, made by the kernel: ``FICLONE``
(a reflink sharing blocks until either side writes) where the file system has them, as btrfs
and XFS do; else ``copy_file_range``, which on ext4 copies through the page cache;
``sendfile`` across file systems. Its price on the local tree (16 nodes on 2 cores,
/bin/true's 3.4 MiB closure, interleaved against the hard links) is 5-8 ms more CPU per node
and job and 40-150 ms more per launch, on a machine loaded by other work (load 10-40). Spare
copies made ahead in a low-priority thread were tried: they take the copy off the launch
path on an idle node (0.09 ms to place either set) but on the local tree gave the same
launch time for 7-20% more daemon CPU (a spare still being made when the next job comes
means two copies), so they are not kept. An overlay mount per private job with links to the
blobs as its lower layer costs less (0.14 ms to mount) but guards only the job's view: a
root job can reach the lower layer's files, which are the blobs, by their own path, and
since links move ctime the stamp below could not tell.

A blob itself is written once, by us, in the cache directory (the receiving path spools an
admitted file there, checks its digest, and copies the job's file out of it), and then only
read. So its (size, mtime_ns, ctime_ns, ino) stays what it was when it was stored, and a blob
changed behind our back (say by a root job writing into the cache directory; ctime cannot be
set back without moving the clock) is re-hashed before it is handed out, and dropped if its
bytes no longer match its name. A blob this daemon has not seen yet (after a restart) is
re-hashed on first use.

Admission: a file is cached as it arrives only if it is at most :data:`ADMIT_BYTES`, or if a
file of the same digest arrived here before (the "doorkeeper" of TinyLFU caches). The first
arrival of a larger file is written straight into the job's file, as without a cache, and
the cache only remembers its digest, in a bounded set of the last :data:`SEEN` such digests;
its second arrival is cached, so from its third run it ships nothing. A file shipped once (a
data set sent with ``gproc cp`` or ``-f``, fresh bytes each time) paid for a copy it never
used: on the Docker harness (tmpfs, no reflinks) the copy out of the spool costs about 24 ms
of CPU per node for 32 MiB, about a second of a 7.7 s transfer of 32 MiB to 80 nodes on
2 cores. Measured on a tmpfs on this machine (an Unpacker with a BlobCache taking a fresh
32 MiB file in 1 MiB chunks with their sha256s, median of 7, two runs), the node's CPU for
the file went from 34-38 ms to 14-15 ms. Worse, in a bounded LRU cache one such file pushes
out the small files that are used again (the program, libc). A digest enters the set only
once the bytes arrived and matched it, never as a manifest claims it; a digest claimed
falsely against the set only has its bytes spooled, refused and removed.

Thread safety: jobs unpack in worker threads and share one cache. A lock guards the
bookkeeping (the LRU index, the size, eviction, the digests seen); hashing and copying happen
outside it, on a file descriptor opened first, so a blob evicted meanwhile is still copied
whole, and a blob already gone makes :meth:`BlobCache.copy_out` return False (the file is
shipped instead).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from gproc.digest import digest_fd
from gproc.errors import warn

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the source's blocks, copy on write
BLOCK = 1 << 20
# What FICLONE and copy_file_range say when the file systems cannot do it: try the next way.
_CANNOT = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_SPOOL = ".in-"  # prefix of files being received into the cache; never a blob's name
_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

ADMIT_BYTES = 4 << 20
"""Files up to this size are cached on their first arrival, larger ones on their second.

Programs and their libraries are almost all below it (libc is about 2 MB, /bin/true's whole
closure 3.4 MiB); they are what is run again, and for them the copy out of the spool is
cheap: it costs in proportion to the size, under 0.8 ms of CPU per MiB on a tmpfs, so a few
ms at most per file. Above it are mostly data files shipped once, for which the copy costs
every node that CPU for nothing (about 24 ms per 32 MiB) and the blob pushes the small files
out of the cache.
"""
SEEN = 1024  # digests of large files that arrived but were not cached, remembered at most


def create(path: str, readable: bool = False) -> int:
    """A new file at ``path``, owner-only, never an existing one and never through a symlink."""
    return os.open(path, _CREATE | (os.O_RDWR if readable else os.O_WRONLY), 0o600)


Stamp = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, ino)


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class BlobCache:
    """The blobs under ``path``, at most ``limit`` bytes of them; safe to share between threads."""

    def __init__(self, path: Path, limit: int, admit_bytes: int = ADMIT_BYTES, seen: int = SEEN):
        self.path = str(path)  # plain strings: pathlib costs more than the syscalls here
        self.limit = limit
        self.admit_bytes = admit_bytes  # cached at first arrival up to this size (admits)
        self.seen_max = seen
        # digests of files over admit_bytes whose bytes arrived and matched: oldest first
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # the daemon's alone: jobs get copies, never the blobs
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._clone = True  # until FICLONE says this file system has no reflinks
        # blob path -> (size, stamp when this daemon last checked it, or None): oldest first
        self._index: OrderedDict[str, tuple[int, Stamp | None]] = OrderedDict()
        found = []
        with os.scandir(self.path) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False) and _BLOB_NAME.fullmatch(e.name):
                    st = e.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, e.path, st.st_size))
                else:  # a spool a killed predecessor left, or nothing of ours
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
        return True

    def holds(self, digest: bytes) -> bool:
        """Whether a blob of this digest is in the index (it may still prove changed)."""
        with self._lock:
            return self._blob(digest) in self._index

    def _intact(self, blob: str, fd: int, st: os.stat_result, digest: bytes) -> bool:
        """The blob open on ``fd`` still holds the bytes of its name (re-hashed if in doubt)."""
        stamp = _stamp(st)
        with self._lock:
            known = self._index.get(blob)
        if known is not None and known[1] == stamp:
            return True
        if digest_fd(fd) == digest:
            with self._lock:
                if blob in self._index:
                    self._index[blob] = (st.st_size, stamp)
            return True
        warn("gproc.cache", "cached %s changed since it was stored; dropping it", blob)
        with self._lock:
            self._drop(blob, st.st_ino)
        return False

    # ---------------------------------------------------------------- taking in

    def admits(self, size: int, digest: bytes) -> bool:
        """Whether a file of ``size`` bytes, said to have ``digest``, is received into the cache.

        Yes up to :attr:`admit_bytes` (:data:`ADMIT_BYTES`); above it, only when a file of
        this digest arrived here before and matched it (:meth:`saw`); never when it is larger
        than the whole cache. ``digest`` is only the manifest's claim until the bytes have
        arrived, so nothing is recorded here: a false claim of a digest seen before gets its
        bytes spooled, refused and removed, as a false claim of any small file does.
        """
        if size > self.limit:
            return False
        if size <= self.admit_bytes:
            return True
        with self._lock:
            return digest in self._seen

    def saw(self, size: int, digest: bytes) -> None:
        """A file of ``size`` bytes that was not admitted arrived whole and matched ``digest``.

        Remembered among the last :attr:`seen_max` such digests (least recently seen out
        first), so its next arrival is cached. Call it only once the bytes have been checked:
        a client that could record digests without sending their bytes would only make
        nodes pay the copy of a file that is not used again, but it cannot. Files the cache
        would never keep (larger than it) are not remembered. A digest stays here once its
        file is cached, so if the blob is evicted, the file's next arrival is cached again.
        """
        if size <= self.admit_bytes or size > self.limit:
            return
        with self._lock:
            self._seen[digest] = None
            self._seen.move_to_end(digest)
            while len(self._seen) > self.seen_max:
                self._seen.popitem(last=False)

    def spool(self, size: int) -> str | None:
        """A fresh name in the cache directory to receive a file of ``size`` bytes into.

        None when the file would not be kept (larger than the whole cache). The caller
        creates it, writes and checks the bytes, then calls :meth:`keep` or removes it. The
        receiving path asks :meth:`admits` first.
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
        """Keep a copy of the file ``src`` if its bytes hash to ``digest``.

        Whatever its size (up to the limit): the caller decided to keep it, so :meth:`admits`
        is not asked.
        """
        size = os.path.getsize(src)
        spool = self.spool(size)
        if spool is None:
            return
        dst = -1
        try:
            with open(src, "rb") as f:
                dst = create(spool, readable=True)
                self.copy_fd(f.fileno(), dst, size)
            if digest_fd(dst) != digest:
                raise OSError(errno.EINVAL, "bytes do not match the digest given")
            self.keep(spool, dst, digest)
        except OSError as e:
            warn("gproc.cache", "cannot cache %s: %s", src, e)
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
        """Forget and remove ``blob``; lock held.

        With ``ino``, only if it is still that inode: checked bytes kept meanwhile stay.
        """
        try:
            if ino is not None and os.stat(blob).st_ino != ino:
                return
            os.unlink(blob)
        except FileNotFoundError:
            pass
        entry = self._index.pop(blob, None)
        if entry is not None:
            self.size -= entry[0]

    # ---------------------------------------------------------------- copying

    def copy_fd(self, src: int, dst: int, size: int) -> None:
        """Copy ``size`` bytes from offset 0 of ``src`` to ``dst``, the cheapest way there is.

        A reflink where the file system has them, else as :func:`copy_fd`. Offsets are
        explicit, so ``src``'s file position does not matter. OSError if ``src`` has fewer
        than ``size`` bytes.
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

    def send(left: int, at: int) -> int:
        os.lseek(dst, at, os.SEEK_SET)  # sendfile writes at dst's own offset
        return os.sendfile(dst, src, at, left)

    done = 0
    for kernel_copy in (lambda left, at: os.copy_file_range(src, dst, left, at, at), send):
        while done < size:
            try:
                n = kernel_copy(size - done, done)
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
