"""Starting a job's program on a node, optionally in a private mount namespace.

The slave daemon forks the program itself; the private mount is set up in the child between
fork and exec (``preexec_fn``), so a job costs one fork, not a Python start. In the child:
a new mount namespace (plus a user namespace when not root), every mount made private so
nothing propagates back, and the job's staging directory bind-mounted over binRoot. When the
last process of the job exits the namespace and its mount are gone with it; the daemon then
removes the staging directory, so nothing of the job is left on the node.

Every job process asks the kernel for SIGKILL when the daemon dies (``PR_SET_PDEATHSIG``) and
leads its own session, so the daemon can kill the whole process group on cancel.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass

from gproc.errors import GprocError
from gproc.users import RunAs, drop_to

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class SandboxError(GprocError):
    """The private mount cannot be made here; the message suggests -p=false."""


@dataclass(frozen=True)
class Launch:
    """What to exec and where: the program's argv, environment and working directory."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    bind: tuple[str, str] | None = None  # (staging dir, binRoot) for a private mount
    lower: str | None = None  # a shared tree (gproc.trees): bind is then an overlay's upper
    work: str | None = None  # the overlay's work directory, beside the upper one
    user: RunAs | None = None  # drop to this user after the mount (the daemon is root)
    stdin: bool = False  # a pipe for the client's standard input, else /dev/null


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_private_root(
    stage: str, bin_root: str, lower: str | None = None, work: str | None = None
) -> None:
    """In the forked child: own mount namespace with ``stage`` mounted over ``bin_root``.

    With ``lower`` (a shared tree of the job's files) and ``work``, an overlay: the job sees
    the tree with ``stage`` over it, and whatever it writes lands in ``stage``, never in the
    tree.
    """
    if os.geteuid() == 0:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    else:
        uid, gid = os.geteuid(), os.getegid()
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    if lower is not None and work is not None:
        options = f"lowerdir={lower},upperdir={stage},workdir={work}".encode()
        _check(
            _libc.mount(b"overlay", bin_root.encode(), b"overlay", 0, options),
            f"overlay {stage} over {bin_root}",
        )
        return
    _check(
        _libc.mount(stage.encode(), bin_root.encode(), None, MS_BIND | MS_REC, None),
        f"bind {stage} over {bin_root}",
    )


def _child_setup(launch: Launch) -> None:
    """Between fork and exec: the mount as root, then the user, then what the user may do.

    The parent-death signal is asked for after the drop, because changing the user clears it.
    """
    if launch.bind is not None:
        enter_private_root(*launch.bind, launch.lower, launch.work)
    if launch.user is not None:
        drop_to(launch.user)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(launch.cwd)


async def start(launch: Launch) -> asyncio.subprocess.Process:
    """Fork and exec the program with pipes for its output; raises OSError or SandboxError."""
    try:
        return await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=subprocess.PIPE if launch.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=launch.env,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(launch),
        )
    except subprocess.SubprocessError as e:
        if launch.user is not None and launch.bind is None:
            raise SandboxError(f"cannot run as {launch.user.name}: {e}") from None
        if launch.bind is not None:
            raise SandboxError(
                f"cannot set up the private mount over {launch.bind[1]} ({e}); "
                "run as root, allow user namespaces, or pass -p=false"
            ) from None
        raise OSError(f"cannot start {launch.argv[0]}: {e}") from None


def kill_group(proc: asyncio.subprocess.Process, force: bool = False) -> None:
    """SIGKILL the job's whole process group (it leads its own session).

    ``force`` also after the leader has exited: what it started in the background lives
    on in its group, and a job leaves nothing behind.
    """
    if proc.returncode is None or force:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def exit_status(returncode: int) -> int:
    """The shell's convention: 128+signal for a signal, else the exit code."""
    return 128 - returncode if returncode < 0 else returncode
