"""Length-prefixed frames off a socket with no copy of a large frame's bytes in Python.

asyncio's StreamReader receives into a new bytes object, appends it to its buffer and copies
a frame out again with ``readexactly``: three passes over every byte of a 1 MiB data chunk
before anything looks at it, and for a shipped file that was most of a leaf's memory
traffic after the kernel's. Here the transport reads (``recv_into``) straight into the
buffer a frame will live in: small frames arrive in a shared buffer and are copied out once
(they are small), and a frame over :data:`SMALL` bytes gets a buffer of its exact size,
which the kernel fills and the frame keeps (a data frame's chunk is a view of it).

The writing side stays asyncio's :class:`asyncio.StreamWriter`, so ``drain`` and closing
behave as they always did; :func:`open_connection`, :func:`start_server` and
:func:`start_unix_server` hand a handler the same ``(reader, writer)`` pair asyncio's do,
with a :class:`FrameReader` as the reader.

The length word is checked by the caller (:meth:`FrameReader.next`) before a large frame's
buffer is allocated, so a peer cannot make us allocate more than the caller's limit, and at
most one large frame and :data:`BUFFER` bytes are held per connection: reading pauses when
the caller falls behind.
"""

from __future__ import annotations

import asyncio
import asyncio.streams
from collections.abc import Awaitable, Callable
from typing import Any

from gproc.protocol import LENGTH

BUFFER = 256 << 10  # shared receive buffer for small frames
SMALL = 64 << 10  # frames longer than this get their own buffer

Handler = Callable[["FrameReader", asyncio.StreamWriter], Awaitable[None]]


class Incomplete(Exception):
    """The stream ended: between frames (``pending`` 0) or ``pending`` bytes into one."""

    def __init__(self, pending: int):
        super().__init__(pending)
        self.pending = pending


class FrameReader:
    """The frames a :class:`FrameProtocol` receives, taken one at a time by :meth:`next`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._buf = bytearray(BUFFER)
        self._lo = self._hi = 0  # unread bytes of _buf
        self._big: bytearray | None = None  # the large frame being received, if any
        self._big_filled = 0
        self._into_big = False  # what get_buffer last handed out
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._paused = False

    # ---------------------------------------------------------------- the protocol's side

    def get_buffer(self) -> memoryview:
        if self._big is not None and self._big_filled < len(self._big):
            self._into_big = True
            return memoryview(self._big)[self._big_filled :]
        self._into_big = False
        if self._hi == len(self._buf):
            self._compact()
        return memoryview(self._buf)[self._hi :]

    def buffer_updated(self, n: int) -> None:
        if self._into_big:
            self._big_filled += n
        else:
            self._hi += n
            if self._hi == len(self._buf) and self._lo == 0:
                self._pause()  # full: the caller must take a frame (or size one) first
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    # ---------------------------------------------------------------- the caller's side

    async def next(self, check: Callable[[int], None]) -> tuple[bytes, bytes | bytearray]:
        """The next frame's length word and body; ``check(length)`` raises to refuse a length
        before anything is allocated for it. Incomplete at the end of the stream."""
        while True:
            frame = self._take(check)
            if frame is not None:
                return frame
            if self._exception is not None:
                raise self._exception
            if self._eof:
                raise Incomplete(self._big_filled if self._big is not None else self._hi - self._lo)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self, check: Callable[[int], None]) -> tuple[bytes, bytes | bytearray] | None:
        if self._big is not None:
            if self._big_filled < len(self._big):
                return None
            frame, self._big = (self._big_head, self._big), None
            self._resume()
            return frame
        if self._hi - self._lo < 4:
            return None
        head = bytes(self._buf[self._lo : self._lo + 4])
        (size,) = LENGTH.unpack(head)
        check(size)
        start = self._lo + 4
        if self._hi - start >= size:
            self._lo = start + size
            body = bytes(self._buf[start : self._lo])
            if self._lo == self._hi:
                self._lo = self._hi = 0
            self._resume()
            return head, body
        if size > SMALL:
            self._start_big(head, size, start)
        elif self._hi == len(self._buf):
            self._compact()
            self._resume()
        return None

    def _start_big(self, head: bytes, size: int, start: int) -> None:
        """Move a large frame's first bytes into its own buffer, which the kernel fills."""
        have = self._hi - start
        self._big = bytearray(size)
        self._big[:have] = self._buf[start : self._hi]
        self._big_head, self._big_filled = head, have
        self._lo = self._hi = 0
        self._resume()

    def _compact(self) -> None:
        if self._lo:
            unread = self._hi - self._lo
            self._buf[:unread] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, unread

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()


class FrameProtocol(asyncio.streams.FlowControlMixin, asyncio.BufferedProtocol):
    """A transport's protocol: receiving into a :class:`FrameReader`, writing through a
    StreamWriter (whose drain and wait_closed this supports, as StreamReaderProtocol does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler | None = None):
        super().__init__(loop)
        self.reader = FrameReader(loop)
        self.writer: asyncio.StreamWriter | None = None
        self._handler = handler
        self._closed: asyncio.Future[None] = loop.create_future()
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.reader._transport = transport
        # no reader for the writer: it accepts only asyncio's own; what the reading side
        # meets, the reader raises to whoever reads, and a dead link fails drain() anyway
        self.writer = asyncio.StreamWriter(transport, self, None, self._loop)
        if self._handler is not None:
            self._task = self._loop.create_task(self._handler(self.reader, self.writer))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.buffer_updated(nbytes)

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return False  # close the transport: frames only ever go both ways

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.reader.feed_eof()
        else:
            self.reader.set_exception(exc)
        if not self._closed.done():
            if exc is None:
                self._closed.set_result(None)
            else:
                self._closed.set_exception(exc)
                self._closed.exception()  # retrieved: nobody may wait for it
        super().connection_lost(exc)

    def _get_close_waiter(self, stream: Any) -> asyncio.Future[None]:
        return self._closed


async def open_connection(host: str, port: int) -> tuple[FrameReader, asyncio.StreamWriter]:
    """As asyncio.open_connection, with a FrameReader."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: FrameProtocol(loop), host, port)
    assert protocol.writer is not None
    return protocol.reader, protocol.writer


async def start_server(handler: Handler, host: str, port: int, **kw: Any) -> asyncio.Server:
    """As asyncio.start_server: ``handler(reader, writer)`` runs as a task per connection."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FrameProtocol(loop, handler), host, port, **kw)


async def start_unix_server(handler: Handler, path: str, **kw: Any) -> asyncio.Server:
    """As asyncio.start_unix_server, with a FrameReader."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: FrameProtocol(loop, handler), path, **kw)
