"""gproc.stream's small pieces that every daemon leans on."""

from __future__ import annotations

import asyncio

import pytest

from gproc.stream import within


def test_within_lets_a_stop_through_as_the_awaited_frame_arrives() -> None:
    """A cancellation (a daemon's SIGTERM) in the instant the awaited thing completes must
    still cancel the caller; asyncio.wait_for before 3.12 returned the result instead."""

    async def main() -> None:
        frame: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(within(frame, 10))
        await asyncio.sleep(0)  # the caller now waits on the frame
        frame.set_result("welcome")
        caller.cancel()  # in the same turn of the loop
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(main())


def test_within_times_out_and_cancels_what_it_waited_on() -> None:
    async def main() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(30))
        with pytest.raises(asyncio.TimeoutError):
            await within(inner, 0.05)
        assert inner.cancelled()

    asyncio.run(main())


def test_within_passes_the_result_and_the_error_on() -> None:
    async def fails() -> None:
        raise ConnectionResetError("gone")

    async def main() -> None:
        assert await within(asyncio.sleep(0, "frame"), 5) == "frame"
        with pytest.raises(ConnectionResetError):
            await within(fails(), 5)

    asyncio.run(main())
