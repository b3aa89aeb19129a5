"""The wire format: length-prefixed msgpack frames, and a blocking connection for clients.

Every frame is a 4-byte big-endian length followed by one msgpack map with a ``t`` (type)
field. Lengths above :data:`MAX_FRAME` are refused before any byte of the body is read, so a
hostile peer cannot make a daemon allocate more than that. File bytes travel in chunks of
:data:`CHUNK` bytes, far below the cap. The daemons speak it over asyncio streams
(gproc.stream); the short-lived clients use :class:`BlockingConn`, which spares every
``gproc e`` the import of asyncio.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from gproc.errors import GprocError

VERSION = 1
MAX_FRAME = 4 << 20
CHUNK = 256 << 10
LENGTH = struct.Struct(">I")

Frame = dict[str, Any]
Tree = dict[str, Any]  # {"id", "name", "addr", "state", "children": [Tree, ...]}


class ProtocolError(GprocError):
    """The peer broke the protocol; the connection is closed with this reason logged."""


def encode(frame: Frame) -> bytes:
    """One frame, ready to write: length prefix and msgpack body."""
    body = msgpack.packb(frame, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return LENGTH.pack(len(body)) + body


def body_length(head: bytes) -> int:
    """The body length a header announces, refused above the cap."""
    (size,) = LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame length {size} exceeds the {MAX_FRAME}-byte cap")
    return size


def decode(body: bytes) -> Frame:
    """A frame body as a dict with a string type, or ProtocolError."""
    try:
        frame = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable frame: {type(e).__name__}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
        raise ProtocolError("frame is not a map with a type field")
    return frame


class BlockingConn:
    """A framed Unix-socket connection for a client: one thread may send while one receives."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def send(self, frame: Frame) -> None:
        self.sock.sendall(encode(frame))

    def recv(self) -> Frame | None:
        """The next frame, or None on a clean end of stream between frames."""
        head = self.rfile.read(4)
        if not head:
            return None
        if len(head) < 4:
            raise ProtocolError("connection closed inside a frame header")
        size = body_length(head)
        body = self.rfile.read(size)
        if len(body) < size:
            raise ProtocolError(f"connection closed inside a {size}-byte frame")
        return decode(body)

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()
