"""Attacks on the job launcher (gproc.spawner, driven by gproc.sandbox.Launcher).

The launcher runs as root beside each slave and forks every job: what a job may learn of it,
what a job runs as, and what happens when the launcher dies at the worst moment. Real
launchers, real programs, and for the user's side a real user made for the test (the
fixtures of tests/test_users.py, which remove it afterwards).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import wait_until
from test_launcher import alive, finish, launch
from test_launcher import with_launcher as run
from test_users import USERS_GROUP, Place, User, place, users

from gproc import sandbox
from gproc.users import RunAs

FIXTURES = (place, users)  # test_users' module fixtures: two users made for the test

pytestmark = USERS_GROUP  # see test_users: useradd in parallel races

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the launcher drops to users as root")
needs_users = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd"),
    reason="needs root and useradd: the test creates a user and runs jobs as that user",
)


def run_as(user: User) -> RunAs:
    return RunAs(
        user.name,
        user.uid,
        user.gid,
        tuple(os.getgrouplist(user.name, user.gid)),
        user.home,
        "/bin/sh",
    )


# ---------------------------------------------------------------- what a user's job is


PROBE = """
ls /proc/self/fd | tr '\\n' ' '; echo
grep -E '^(Uid|Gid|Groups|NoNewPrivs):' /proc/self/status | tr -s '\\t ' ' '
ps -o sid= -p $$
pwd
kill -0 "$1" 2>/dev/null && echo signalled-launcher || echo launcher-out-of-reach
ls /proc/"$1"/fd >/dev/null 2>&1 && echo read-launcher-fds || echo launcher-fds-closed
"""


@needs_users
def test_a_users_job_is_that_user_alone_in_every_path(
    place: Place, users: tuple[User, User, str]
) -> None:
    """A job run as a user, with no private mount, with one (bind) and with an overlay:
    exactly that user's uid, gid and groups, no-new-privileges, its own session, fds 0-2
    only (never the launcher's socket or pipes), and the launcher (root) out of its reach.
    The program is named bare, found on the job's PATH as a shell would."""
    user = users[0]
    who = run_as(user)
    tmp_path = Path(tempfile.mkdtemp(dir=place.root))  # a place the user may enter
    bin_root, stage, work, lower = (tmp_path / n for n in ("bin", "stage", "work", "lower"))
    for d in (bin_root, stage, work, lower):
        d.mkdir()
    for d in (tmp_path, bin_root, lower):
        d.chmod(0o755)  # binRoot and the shared tree are root's, readable by all
    os.chown(stage, user.uid, user.gid)
    paths = {
        "plain": {},
        "bind": {"bind": (str(stage), str(bin_root))},
        "overlay": {"bind": (str(stage), str(bin_root)), "lower": str(lower), "work": str(work)},
    }
    groups = sorted(os.getgrouplist(user.name, user.gid))

    async def body(launcher: sandbox.Launcher) -> None:
        assert launcher._proc is not None
        spy = str(launcher._proc.pid)
        for name, kw in paths.items():
            job = await launcher.start(
                launch("sh", "-c", PROBE, "probe", spy, cwd=str(bin_root), user=who, **kw)
            )
            status, out, err = await finish(job)
            assert status == 0, (name, err)
            lines = out.decode().splitlines()
            assert lines[0].split() == ["0", "1", "2", "3"], (name, out)  # 3: ls's own
            assert lines[1] == f"Uid: {user.uid} {user.uid} {user.uid} {user.uid}", name
            assert lines[2] == f"Gid: {user.gid} {user.gid} {user.gid} {user.gid}", name
            assert sorted(map(int, lines[3].split()[1:])) == groups, (name, lines[3])
            assert lines[4] == "NoNewPrivs: 1", name
            assert int(lines[5]) == job.pid, (name, "its own session")
            assert lines[6] == str(bin_root), name
            assert lines[7:] == ["launcher-out-of-reach", "launcher-fds-closed"], name

    run(body)


# ---------------------------------------------------------------- no import after the drop


@root_only
def test_a_bare_program_name_needs_nothing_imported_between_fork_and_exec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PATH search ran os.get_exec_path in the forked child, which imports ``warnings``
    from the daemon's Python, after the child became the job's user. A user who may not read
    that Python's library (one installed under /root, as pyenv puts it) could not run any
    program named bare: 'No module named warnings', reported as EINVAL. The old in-daemon
    path (subprocess) searched PATH in the parent. Here the launcher may import nothing once
    started, whoever the job runs as: a bare name must still be found."""
    source = sandbox._SOURCE.replace(
        b'\nif __name__ == "__main__":', b'\nsys.path.clear()\nif __name__ == "__main__":'
    )
    assert source != sandbox._SOURCE
    monkeypatch.setattr(sandbox, "_SOURCE", source)

    async def body(launcher: sandbox.Launcher) -> None:
        job = await launcher.start(launch("echo", "found"))
        assert await finish(job) == (0, b"found\n", b"")
        with pytest.raises(FileNotFoundError):
            await launcher.start(launch("no-such-program-on-path"))

    run(body)


# ---------------------------------------------------------------- the fork-to-exec window

TRACER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_SEIZE, PTRACE_DETACH, PTRACE_GETEVENTMSG, O_TRACEFORK = 0x4206, 17, 0x4201, 2
launcher = int(sys.argv[1])
assert libc.ptrace(PTRACE_SEIZE, launcher, None, O_TRACEFORK) == 0, ctypes.get_errno()
print("seized", flush=True)
while True:  # the launcher forks the job: the kernel stops both and attaches the child
    _, status = os.waitpid(launcher, os.__dict__.get("__WALL", 0x40000000))
    if os.WIFSTOPPED(status) and status >> 16 == 1:  # PTRACE_EVENT_FORK
        break
child = ctypes.c_ulong()
libc.ptrace(PTRACE_GETEVENTMSG, launcher, None, ctypes.byref(child))
os.waitpid(child.value, 0x40000000)  # the child's first stop: before its first instruction
os.kill(launcher, signal.SIGKILL)  # the launcher dies (OOM) while the job is being set up
while True:
    _, status = os.waitpid(launcher, 0x40000000)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        break
libc.ptrace(PTRACE_DETACH, child.value, None, None)  # the child goes on, orphaned
print(child.value, flush=True)
"""


@root_only
def test_a_job_whose_launcher_dies_before_it_asked_for_the_parent_death_signal_never_runs(
    tmp_path: Path,
) -> None:
    """Between fork and PR_SET_PDEATHSIG (after the mount and the drop to the user) the child
    has no parent-death signal yet: if the launcher dies in that window (OOM-killed, or
    taken by the slave's death), the child went on and exec'd the job, orphaned. The slave
    reports that start as failed, so nobody would ever kill it, time it out or see its
    output. A tracer stops the child at its first instruction and kills the launcher there;
    the child must then give up instead of running the program."""
    marker = tmp_path / "ran"

    async def body(launcher: sandbox.Launcher) -> None:
        assert launcher._proc is not None
        tracer = subprocess.Popen(
            [sys.executable, "-c", TRACER, str(launcher._proc.pid)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert tracer.stdout is not None
            assert await asyncio.to_thread(tracer.stdout.readline) == "seized\n"
            job = launch("sh", "-c", f"echo ran > {marker}")
            with pytest.raises(sandbox.SandboxError, match="launcher exited while starting"):
                await launcher.start(job)
            child = int(await asyncio.to_thread(tracer.stdout.readline))
            await asyncio.to_thread(wait_until, lambda: not alive(child), 30, "the child lived")
        finally:
            tracer.kill()
            tracer.wait()
        assert not marker.exists(), "the orphaned child ran the job's program"
        again = await launcher.start(launch("/bin/echo", "a new launcher serves"))
        assert await finish(again) == (0, b"a new launcher serves\n", b"")

    run(body)


# ---------------------------------------------------------------- a child stopped before exec

STOPPER = """
import os, signal, time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # every process of mine but me, as fast as I can
    try:
        os.kill(-1, signal.SIGSTOP)
    except ProcessLookupError:
        pass
"""


def _children_stopped(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] == "T" and int(stat[1]) == parent:
            found.append(int(entry))
    return found


@needs_users
def test_a_user_who_stops_her_job_before_its_exec_holds_up_no_one_else(
    place: Place, users: tuple[User, User, str]
) -> None:
    """After the drop to the user and before the exec, the forked child is the user's: she
    may stop it (kill -STOP -1 in a loop catches it; a long PATH to search widens the
    window). The launcher waited for the child's exec in a blocking read, so one stopped
    child held up every later start on the node, for every user, for ever. A stopped child
    may hold up its own start only."""
    user = users[0]
    stopper = subprocess.Popen(
        [place.python, "-c", STOPPER], user=user.uid, group=user.gid, extra_groups=[]
    )
    path = ":".join(f"/nonexistent/{i:05}" for i in range(6000))  # under 128 KiB

    async def body(launcher: sandbox.Launcher) -> None:
        assert launcher._proc is not None
        spy = launcher._proc.pid
        held = launch("no-such-program", user=run_as(user))
        held = sandbox.Launch(held.argv, {"PATH": path}, "/", user=held.user)
        first = asyncio.ensure_future(launcher.start(held))
        try:
            caught: list[int] = []
            await asyncio.to_thread(
                wait_until,
                lambda: bool(caught.extend(_children_stopped(spy)) or caught) or first.done(),
                30,
                "the user's loop never caught her child before its exec",
            )
            assert not first.done(), "the child was caught after its exec, not before"
            stopper.kill()
            other = await asyncio.wait_for(launcher.start(launch("/bin/echo", "mine")), 10)
            assert await finish(other) == (0, b"mine\n", b"")
        finally:
            stopper.kill()
            for pid in _children_stopped(spy):
                os.kill(pid, signal.SIGKILL)
            await asyncio.gather(first, return_exceptions=True)

    try:
        run(body)
    finally:
        stopper.kill()
        stopper.wait()
