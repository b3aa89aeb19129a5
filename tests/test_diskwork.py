"""Where a slave's file steps run: the file system test against stat(1), and both ways of
running a step giving its result or its error to whoever awaits it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading

import pytest

from gproc import diskwork


def _stat_says_in_memory(path: str) -> bool:
    """coreutils' own reading of statfs(2), as the oracle."""
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    return kind in ("tmpfs", "ramfs")


@pytest.mark.skipif(shutil.which("stat") is None, reason="needs coreutils' stat")
@pytest.mark.parametrize("where", ["tmp", "/", "/dev/shm", "/proc"])
def test_in_memory_agrees_with_stat(where: str, tmp_path) -> None:
    path = str(tmp_path) if where == "tmp" else where
    assert diskwork.in_memory(path) == _stat_says_in_memory(path)


def test_a_path_that_is_not_there_is_not_in_memory(tmp_path) -> None:
    assert diskwork.in_memory(str(tmp_path / "gone")) is False


@pytest.mark.parametrize("at_once", [True, False])
def test_a_step_gives_its_result_or_its_error_where_it_is_awaited(at_once: bool) -> None:
    def work(value: int) -> tuple[int, int]:
        if value < 0:
            raise OSError("no space left")
        return value * 2, threading.get_ident()

    async def main() -> None:
        loop_thread = threading.get_ident()
        doubled, ran_on = await diskwork.step(at_once, work, 21)
        assert doubled == 42
        assert (ran_on == loop_thread) is at_once  # at once in the loop, else in a thread
        with pytest.raises(OSError, match="no space left"):
            await diskwork.step(at_once, work, -1)

    asyncio.run(main())
