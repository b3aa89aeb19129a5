"""A node's cache of shipped files, by content hash, so a program's bytes cross the tree once.

People run the same binary again and again; its libc does not change between runs. Each
slave keeps the files it has received, named by their sha256, in a directory beside binRoot
(bounded in size, oldest out first). When a job arrives, a node answers with the files it
does not hold, every hop passes the union up, and the client sends only those; each hop then
forwards a file only to the children that asked for it. A job always gets its own copy of a
cached file, so what a job does to its files cannot reach the cache or another job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("gproc.cache")


class BlobCache:
    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())

    def _blob(self, digest: bytes) -> Path:
        return self.path / digest.hex()

    def copy_out(self, digest: bytes, dest: str) -> bool:
        """Copy the cached blob to ``dest``; False when it is not (or no longer) cached."""
        blob = self._blob(digest)
        try:
            shutil.copyfile(blob, dest)
            os.utime(blob)
        except FileNotFoundError:
            return False
        return True

    def add(self, src: str, digest: bytes) -> None:
        """Keep a copy of a received, verified file; evict the oldest beyond the limit."""
        blob = self._blob(digest)
        if blob.exists():
            return
        size = os.path.getsize(src)
        if size > self.limit:
            return
        tmp = blob.with_suffix(f".tmp{os.getpid()}")
        try:
            shutil.copyfile(src, tmp)
            tmp.replace(blob)
        except OSError as e:
            log.warning("cannot cache %s: %s", src, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self.size += size
        if self.size > self.limit:
            self._evict()

    def _evict(self) -> None:
        blobs = sorted((p.stat().st_mtime, p) for p in self.path.iterdir() if p.is_file())
        for _, blob in blobs:
            if self.size <= self.limit * 3 // 4:
                break
            with contextlib.suppress(FileNotFoundError):
                size = blob.stat().st_size
                blob.unlink()
                self.size -= size
