"""Where a slave's file work runs: in a worker thread, or at once in the event loop.

A write to a file system on a disk may wait for the disk: once dirty pages pass the kernel's
limit, the writer is throttled to the device's pace. So a slave hands its file steps
(checking a manifest and making the staging, writing a batch of chunks, removing the staging)
to a worker thread, and the loop keeps relaying and answering heartbeats while one job
waits. Making the staging also looks the job's user up, which may wait on a directory
service, so it always goes to a thread.

On a file system in memory (tmpfs, ramfs: a diskless node's /tmp, the Docker harness) a step
is copies between memory pages that never wait on a device, and for a small step the trip to
the thread and back costs more than the step: a futex to wake the worker, the GIL handed
over and back, the loop woken through its self-pipe. Measured on the harness (32 MiB to 80
nodes with ``gproc e -f``, a fresh file each run, the CPU of one leaf's container from its
cgroup): 103 ms with every batch of chunks written in a thread, 88 ms with them written in
the loop. So there, a batch of at most :data:`SMALL_STEP` chunks is written at once (and a
failed job of at most as many files removed at once); a larger one (a job of many small
files, whose batches create thousands of files) still goes to a thread, so the loop is
never held for long.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SMALL_STEP = 8  # chunks in a batch, or files of a job, handled at once on a file system in RAM
# statfs(2) f_type of the file systems kept in memory (linux/magic.h)
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_STATFS_BYTES = 256  # more than struct statfs takes on any Linux; f_type is its first word

_libc = ctypes.CDLL(None, use_errno=True)


def file_system_type(path: str) -> int:
    """statfs(2)'s f_type for ``path`` (OSError if it cannot be read)."""
    buf = ctypes.create_string_buffer(_STATFS_BYTES)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def in_memory(path: str) -> bool:
    """Whether ``path`` is on a file system kept in memory; False when that cannot be told."""
    try:
        return file_system_type(path) in (TMPFS_MAGIC, RAMFS_MAGIC)
    except OSError:
        return False


def step(at_once: bool, work: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """``work(*args)`` run now when ``at_once``, else in a worker thread; either way a future
    to await, holding its result or what it raised."""
    if not at_once:
        return asyncio.ensure_future(asyncio.to_thread(work, *args))
    done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    try:
        done.set_result(work(*args))
    except Exception as e:  # the caller meets it where it awaits, as from a thread
        done.set_exception(e)
    return done
