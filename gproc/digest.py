"""A shipped file's digest: the sha256 of its chunks' sha256s, so each byte is hashed once.

A file travels in data frames of :data:`CHUNK` bytes, and every frame carries the sha256 of
its chunk (docs/PROTOCOL.md, "Data frames"). A hop checks that sha256 when the frame arrives,
the frame's MAC covers it instead of the bytes, and the node that stores the file builds the
file's digest from the chunk sha256s it has already checked::

    digest(file) = sha256(sha256(chunk 0) || sha256(chunk 1) || ...)

with the file cut into CHUNK-byte pieces (the last one shorter; an empty file has no chunk,
so its digest is sha256 of nothing). The manifest names files by this digest and the node
cache keys blobs by it. Defining it over the chunks is what lets a hop hash a chunk once
for three purposes (the link's integrity, the content's integrity, the cache key): with a
plain sha256 of the file, each node hashed every byte twice, once for the MAC and once for
the file, and a rack master a third time to seal what it forwarded. It is as strong as
sha256 itself (a collision in it gives one in sha256, of the chunks or of the list).
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20  # file bytes per data frame, and the unit the digest is built from
SIZE = 32  # bytes of a sha256


def chunk_digest(data: bytes | memoryview) -> bytes:
    """The sha256 of one chunk (hashlib lets the GIL go for buffers this large)."""
    return hashlib.sha256(data).digest()


class FileDigest:
    """A file's digest built chunk by chunk, from bytes or from chunk sha256s already checked.

    :meth:`add` takes bytes in any pieces and hashes them at chunk boundaries; a piece that
    is exactly the next whole chunk may come with its sha256 (checked by the caller), and is
    then not hashed again.
    """

    def __init__(self) -> None:
        self._list = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._filled = 0  # bytes of the current, unfinished chunk
        self._ended = False  # a short chunk came whole: it was the file's last

    def add(self, data: bytes | memoryview, digest: bytes | None = None) -> None:
        """The file's next bytes; ValueError for bytes after a short chunk given whole."""
        if self._ended:
            raise ValueError("bytes after the file's last, short chunk")
        if digest is not None and self._filled == 0 and len(data) <= CHUNK:
            self._list.update(digest)
            self._ended = len(data) < CHUNK
            return
        view = memoryview(data)
        while view:
            take = min(CHUNK - self._filled, len(view))
            self._chunk.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK:
                self._list.update(self._chunk.digest())
                self._chunk, self._filled = hashlib.sha256(), 0

    def digest(self) -> bytes:
        """The file's digest; call once, after the last byte."""
        if self._filled:
            self._list.update(self._chunk.digest())
            self._filled = 0
        return self._list.digest()


def digest_fd(fd: int) -> bytes:
    """The digest of an open file from offset 0, read a chunk at a time."""
    d = FileDigest()
    offset = 0
    while block := os.pread(fd, CHUNK, offset):
        d.add(block)
        offset += len(block)
    return d.digest()


def digest_file(path: str) -> bytes:
    """The digest of a file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd)
    finally:
        os.close(fd)


def digest_bytes(data: bytes | memoryview) -> bytes:
    """The digest of a file holding ``data``."""
    d = FileDigest()
    d.add(data)
    return d.digest()
