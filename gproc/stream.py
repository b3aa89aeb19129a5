"""Frames over asyncio streams, as the daemons speak them: connections, the handshake,
heartbeats, and the guard around every connection handler.

TCP connections between daemons begin with a versioned hello and a mutual challenge-response
on the shared cluster key (HMAC-SHA256, the idea of MUNGE): each side proves it holds the key
by MACing the other side's fresh nonce, bound to its own role so a reply cannot be reflected
back. A peer without the key learns nothing but the two nonces.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gproc.wire import VERSION, Frame, ProtocolError, body_length, decode, encode

HANDSHAKE_TIMEOUT = 10.0


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None on a clean end of stream between frames."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("connection closed inside a frame header") from None
        return None
    size = body_length(head)
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ProtocolError(f"connection closed inside a {size}-byte frame") from None
    return decode(body)


class Conn:
    """One framed connection; writes are serialised so concurrent jobs can share it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self._drain = asyncio.Lock()
        self.closed = False
        self.last_heard = time.monotonic()
        self.busy = 0  # > 0 while this end is not reading because it is passing a frame on

    async def recv(self) -> Frame | None:
        frame = await read_frame(self.reader)
        self.last_heard = time.monotonic()
        return frame

    async def send(self, frame: Frame) -> None:
        """Write one frame and wait for the buffer to drain (backpressure to the sender)."""
        if self.closed:
            raise ConnectionResetError("connection already closed")
        self.writer.write(encode(frame))
        await self.drain()

    async def drain(self) -> None:
        async with self._drain:
            await self.writer.drain()

    def send_nowait(self, frame: Frame) -> None:
        """Queue one frame without waiting; for small control frames on teardown paths."""
        if not self.closed and not self.writer.is_closing():
            self.writer.write(encode(frame))

    def peer(self) -> str:
        name = self.writer.get_extra_info("peername")
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
        return str(name or "unix socket")

    async def close(self) -> None:
        self.closed = True
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


HEARTBEAT = 5.0
SILENT_BEATS = 4


async def keep_alive(
    peers: Callable[[], Iterable[Conn]], every: float, log: logging.Logger
) -> None:
    """Ping every peer each ``every`` seconds; close one silent for SILENT_BEATS beats.

    TCP alone notices neither a paused peer (its kernel still ACKs) nor a cut cable for many
    minutes; a closed connection is how the relay learns a child or parent is gone.
    """
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        for conn in list(peers()):
            if not conn.busy and now - conn.last_heard > every * SILENT_BEATS:
                log.warning("%s silent for %.0fs; dropping it", conn.peer(), now - conn.last_heard)
                conn.writer.close()
            else:
                conn.send_nowait({"t": "ping"})


def connection_handler(
    log: logging.Logger,
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
    """Wrap a server's per-connection coroutine so nothing a peer does escapes it.

    A handler cancelled at shutdown ends quietly (asyncio 3.11 would log a traceback for
    it), and an unexpected error costs that one connection, logged in one line (with the
    traceback only at debug level), never the daemon.
    """

    def wrap(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(handler)
        async def guarded(*args: Any) -> None:
            try:
                await handler(*args)
            except asyncio.CancelledError:
                pass
            except Exception as e:
                log.error("connection handler failed: %r", e, exc_info=log.isEnabledFor(10))

        return guarded

    return wrap


def _mac(key: bytes, role: bytes, their_nonce: bytes, my_nonce: bytes) -> bytes:
    return hmac.new(
        key, b"gproc-v1|" + role + b"|" + their_nonce + my_nonce, hashlib.sha256
    ).digest()


async def handshake(conn: Conn, key: bytes, role: str, kind: str) -> Frame:
    """Hello plus mutual HMAC proof; returns the peer's hello. ``role`` is "dial" or "accept".

    ``kind`` says what this end is (for example "slave" or "master") and is carried in the hello
    so logs can name it. Raises ProtocolError when the peer is not of this cluster.
    """
    return await asyncio.wait_for(_handshake(conn, key, role, kind), HANDSHAKE_TIMEOUT)


async def _handshake(conn: Conn, key: bytes, role: str, kind: str) -> Frame:
    mine = secrets.token_bytes(32)
    await conn.send({"t": "hello", "v": VERSION, "kind": kind, "nonce": mine})
    hello = await conn.recv()
    if hello is None or hello.get("t") != "hello":
        raise ProtocolError("peer did not say hello")
    if hello.get("v") != VERSION:
        raise ProtocolError(f"peer speaks protocol version {hello.get('v')!r}, not {VERSION}")
    theirs = hello.get("nonce")
    if not isinstance(theirs, bytes) or len(theirs) != 32 or theirs == mine:
        raise ProtocolError("peer sent a bad nonce")
    other = b"accept" if role == "dial" else b"dial"
    await conn.send({"t": "auth", "mac": _mac(key, role.encode(), theirs, mine)})
    auth = await conn.recv()
    if auth is None or auth.get("t") != "auth" or not isinstance(auth.get("mac"), bytes):
        raise ProtocolError("peer did not prove the cluster key")
    if not hmac.compare_digest(auth["mac"], _mac(key, other, mine, theirs)):
        raise ProtocolError("peer does not hold the cluster key")
    return hello
