"""A node's cache of shipped files, by content hash, so a program's bytes cross the tree once.

People run the same binary again and again; its libc does not change between runs. Each
slave keeps the files it has received, named by their sha256, in a directory beside binRoot
(bounded in size, oldest out first). When a job arrives, a node answers with the files it
does not hold, every hop passes the union up, and the client sends only those; each hop then
forwards a file only to the children that asked for it.

A job's files are hard links to the cached blobs (a copy where the mode differs or the link
cannot be made): copying libc into every job was most of a cached launch. The cache
remembers each blob's size and mtime, so a job that writes into a shipped file in place is
noticed the next time the blob is wanted, and the blob is dropped rather than handed on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger("gproc.cache")


class BlobCache:
    def __init__(self, path: Path, limit: int):
        self.path = str(path)  # plain strings: pathlib costs more than the syscalls here
        self.limit = limit
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        self.seen: dict[str, tuple[int, int]] = {}

    def _blob(self, digest: bytes) -> str:
        return os.path.join(self.path, digest.hex())

    def _intact(self, blob: str, st: os.stat_result) -> bool:
        """Unchanged since it was cached; a blob this daemon has not seen yet is re-hashed."""
        stamp = (st.st_size, st.st_mtime_ns)
        if blob not in self.seen:
            if sha256_file(blob).hex() != os.path.basename(blob):
                return False
            self.seen[blob] = stamp
        return self.seen[blob] == stamp

    def copy_out(self, digest: bytes, dest: str, mode: int) -> bool:
        """Put the cached blob at ``dest`` (hard link or copy); False when not cached."""
        blob = self._blob(digest)
        try:
            st = os.stat(blob)
            if not self._intact(blob, st):
                log.warning("cached %s changed since it was stored; dropping it", blob)
                self._drop(blob)
                return False
            if stat.S_IMODE(st.st_mode) == mode:
                try:
                    os.link(blob, dest)
                    return True
                except OSError:
                    pass  # another file system, or links not allowed: copy
            shutil.copyfile(blob, dest)
            os.chmod(dest, mode)
        except FileNotFoundError:
            return False
        return True

    def add(self, src: str, digest: bytes) -> None:
        """Keep a received, verified file (a hard link to it); evict the oldest beyond the limit."""
        blob = self._blob(digest)
        if os.path.exists(blob):
            return
        size = os.path.getsize(src)
        if size > self.limit:
            return
        tmp = f"{blob}.tmp{os.getpid()}"
        try:
            try:
                os.link(src, tmp)  # the received file itself: no second copy of its bytes
            except OSError:
                shutil.copyfile(src, tmp)
                shutil.copymode(src, tmp)
            os.replace(tmp, blob)
            st = os.stat(blob)
            self.seen[blob] = (st.st_size, st.st_mtime_ns)
        except OSError as e:
            log.warning("cannot cache %s: %s", src, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self.size += size
        if self.size > self.limit:
            self._evict()

    def _evict(self) -> None:
        with os.scandir(self.path) as entries:
            blobs = sorted((e.stat().st_mtime, e.path) for e in entries if e.is_file())
        for _, blob in blobs:
            if self.size <= self.limit * 3 // 4:
                break
            self._drop(blob)

    def _drop(self, blob: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            size = os.stat(blob).st_size
            os.unlink(blob)
            self.size -= size
            self.seen.pop(blob, None)


def sha256_file(path: str) -> bytes:
    """The sha256 of a file, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.digest()
