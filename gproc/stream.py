"""Frames over asyncio streams, as the daemons speak them: connections, per-job windows,
heartbeats, rate-limited warnings, and the guard around every connection handler.

A :class:`Conn` reads and writes the frames of gproc.protocol. Before its handshake a TCP
connection accepts only bodies of PREAUTH_MAX bytes (a hello or a proof): a longer length
closes it before one byte of the body is read. After the handshake (gproc.session) every
frame carries a MAC and may be up to MAX_FRAME bytes. Unix-socket clients need no handshake:
the socket's permissions say who may connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from gproc.protocol import (
    LENGTH,
    MAC,
    MAX_FRAME,
    PREAUTH_MAX,
    Frame,
    Ping,
    ProtocolError,
    decode,
    encode,
)
from gproc.wire import FrameReader, Incomplete

if TYPE_CHECKING:
    from gproc.session import Session

T = TypeVar("T")
Sealed = tuple[tuple[bytes | memoryview, ...], bytes]  # a body's parts and its body_digest
LARGE = 64 << 10  # a part this long is written on its own, not joined with its neighbours


class Conn:
    """One framed connection; many jobs write to it, one reader loop reads it."""

    def __init__(
        self,
        reader: FrameReader,
        writer: asyncio.StreamWriter,
        limit: int = PREAUTH_MAX,
    ):
        self.reader = reader
        self.writer = writer
        self.limit = limit
        self.session: Session | None = None
        self._drain = asyncio.Lock()
        self.closed = False
        self.last_heard = time.monotonic()

    def start_session(self, session: Session) -> None:
        """From now on every frame in both directions carries a MAC."""
        self.session = session
        self.limit = MAX_FRAME

    # ------------------------------------------------------------ reading

    async def recv_raw(self) -> tuple[bytes | memoryview, Frame]:
        """The next frame and its body bytes; ConnectionResetError on end of stream."""
        try:
            head, payload = await self.reader.next(self._check_length)
        except Incomplete as e:
            if e.pending:
                raise ProtocolError(f"connection closed {e.pending} bytes into a frame") from None
            raise ConnectionResetError("connection closed") from None
        body = self.session.open(head, payload) if self.session is not None else payload
        frame = decode(body)
        self.last_heard = time.monotonic()
        return body, frame

    def _check_length(self, size: int) -> None:
        """Refuse a frame's length before anything is read or allocated for its body."""
        if self.session is not None:
            if not MAC <= size <= self.limit + MAC:
                raise ProtocolError(f"frame length {size} outside 32..{self.limit + MAC}")
        elif size > self.limit:
            raise ProtocolError(f"frame length {size} exceeds the {self.limit}-byte cap")

    async def recv(self) -> Frame | None:
        """The next frame, or None on a clean end of stream between frames."""
        try:
            return (await self.recv_raw())[1]
        except ConnectionResetError:
            return None

    # ------------------------------------------------------------ writing

    def write_body(self, body: bytes) -> None:
        if self.closed or self.writer.is_closing():
            raise ConnectionResetError("connection already closed")
        if self.session is not None:
            self.writer.write(self.session.seal(body))
        else:
            self.writer.write(LENGTH.pack(len(body)) + body)

    def write_bodies(self, bodies: list[Sealed]) -> None:
        """Several frames, each a (its body in parts, its body_digest), in as few writes as
        keep large parts uncopied.

        Small parts (length words, prefixes, MACs, small bodies) are joined; a part of
        :data:`LARGE` bytes or more (a data chunk) is handed to the transport as it is, which
        sends it from there or keeps it, so a chunk forwarded to many children is not copied
        once per child to be joined with its prefix.
        """
        if self.closed or self.writer.is_closing():
            raise ConnectionResetError("connection already closed")
        small: list[bytes | memoryview] = []
        for parts, digest in bodies:
            size = sum(len(p) for p in parts)
            if self.session is not None:
                head, mac = self.session.seal_parts(size, digest)
                framed: tuple[bytes | memoryview, ...] = (head, *parts, mac)
            else:
                framed = (LENGTH.pack(size), *parts)
            for part in framed:
                if len(part) < LARGE:
                    small.append(part)
                    continue
                if small:
                    self.writer.write(b"".join(small))
                    small = []
                self.writer.write(part)
        if small:
            self.writer.write(b"".join(small))

    def write(self, frame: Frame) -> None:
        """Queue one frame without waiting for the socket (the caller drains when it must)."""
        self.write_body(encode(frame))

    async def send(self, frame: Frame) -> None:
        """Write one frame and wait for the socket buffer to drain."""
        self.write(frame)
        await self.drain()

    async def drain(self) -> None:
        async with self._drain:
            await self.writer.drain()

    def send_nowait(self, frame: Frame) -> None:
        """Queue a small control frame if the connection is open; never raises."""
        try:
            self.write(frame)
        except (ConnectionError, RuntimeError):
            pass

    def peer(self) -> str:
        name = self.writer.get_extra_info("peername")
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
        return str(name or "unix socket")

    async def close(self, grace: float | None = 1.0) -> None:
        """Close, giving queued frames ``grace`` seconds to leave; then drop the link.

        asyncio stops reading a transport closed with unsent data and waits for it to
        drain, which a dead or stalled peer never lets happen: the link would neither send
        nor notice its end. So on a tree link what cannot leave in time is dropped (the
        link aborted). ``None`` waits as long as it takes: the end of a client's job, whose
        last output its reader may take its time over.
        """
        self.closed = True
        if grace is None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() and not transport.is_closing():
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
                await within(self.writer.drain(), grace)
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            self.writer.close()
        try:
            await within(self.writer.wait_closed(), grace)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            transport.abort()


FRAME_COST = 512  # what a window charges for a frame beyond its bytes


def charge(size: int) -> int:
    """What a frame carrying ``size`` bytes costs a window: its bytes plus FRAME_COST, so a
    window also bounds how many frames are in flight (a job of 50,000 tiny files)."""
    return size + FRAME_COST


class Window:
    """Bytes one job may still send on one link before the receiver grants more.

    As an SSH channel's or an HTTP/2 stream's window: the sender takes before it sends and
    waits at zero; the receiver gives back what it has passed on. A sender may overshoot by
    one frame (it waits only while the window is empty), which keeps whole frames whole.
    """

    def __init__(self, size: int):
        self.credit = size
        self._open = asyncio.Event()
        if size > 0:
            self._open.set()
        self.closed = False

    async def take(self, size: int) -> None:
        while not self.try_take(size):
            await self._open.wait()

    def try_take(self, size: int) -> bool:
        """Take ``size`` if the window is open; False (nothing taken) when it is empty."""
        if self.credit <= 0 and not self.closed:
            return False
        self.credit -= size
        if self.credit <= 0 and not self.closed:
            self._open.clear()
        return True

    def give(self, size: int) -> None:
        self.credit += size
        if self.credit > 0:
            self._open.set()

    def close(self) -> None:
        """The link or the job ended: nobody waits on this window any more."""
        self.closed = True
        self._open.set()


class RateLimited:
    """Warnings about refused peers: the first of each interval, then a count of the rest."""

    def __init__(self, log: logging.Logger, interval: float = 10.0):
        self.log = log
        self.interval = interval
        self.window_start = -interval
        self.suppressed = 0
        self.last = ""

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.interval:
            if self.suppressed:
                self.log.warning(
                    "%d more like this in the last %.0fs (the last: %s)",
                    self.suppressed,
                    now - self.window_start,
                    self.last,
                )
            self.window_start = now
            self.suppressed = 0
            self.log.warning(message, *args)
        else:
            self.suppressed += 1
            self.last = message % args if args else message


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """``await awaitable``, or cancel it and raise TimeoutError after ``timeout`` seconds.

    What ``asyncio.wait_for`` does, except that a cancellation of the caller always goes
    through: before Python 3.12, wait_for swallows one that arrives in the instant the
    awaited thing completes (CPython gh-86296), so a daemon told to stop (SIGTERM) just as a
    peer's frame came in went on running as if nothing had been asked.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.TimeoutError
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it at exit."""
    if not task.cancelled():
        task.exception()


HEARTBEAT = 5.0
SILENT_BEATS = 4


async def keep_alive(
    peers: Callable[[], Iterable[Conn]], every: float, log: logging.Logger
) -> None:
    """Ping every peer each ``every`` seconds; close one silent for SILENT_BEATS beats.

    TCP alone notices neither a paused peer (its kernel still ACKs) nor a cut cable for many
    minutes; a closed connection is how the relay learns a child or parent is gone. No reader
    loop ever waits on a job, so a live peer is always heard.
    """
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        for conn in list(peers()):
            if now - conn.last_heard > every * SILENT_BEATS:
                log.warning("%s silent for %.0fs; dropping it", conn.peer(), now - conn.last_heard)
                conn.writer.transport.abort()  # not close(): unsent frames would keep it open
            else:
                conn.send_nowait(Ping())


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


def quiet_loop_errors(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> None:
    """Log the event loop's own errors in one rate-limited line, never a traceback each.

    When the daemon runs out of file descriptors asyncio stops accepting, retries a second
    later and reports every failure with a traceback; a connection flood made 35,000 of
    them. One line per interval says the same.
    """
    limited = RateLimited(log)

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        detail = f": {error!r}" if error is not None else ""
        limited.warn("%s%s", context.get("message", "event loop error"), detail)

    loop.set_exception_handler(handler)
