"""The job launcher (gproc.spawner, driven by gproc.sandbox.Launcher), as real processes.

Each test starts a real launcher interpreter and real programs through it: their output and
exit status come back, the descriptors of many jobs started at once never cross, failures
say what failed, and no job outlives the launcher or the slave.
"""

from __future__ import annotations

import array
import asyncio
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import wait_until

from gproc import sandbox, spawner

ENV = {"PATH": "/usr/bin:/bin"}


def launch(*argv: str, stdin: bool = False, cwd: str = "/", **kw: object) -> sandbox.Launch:
    return sandbox.Launch(argv=list(argv), env=ENV, cwd=cwd, stdin=stdin, **kw)  # type: ignore[arg-type]


def with_launcher(body: Callable[[sandbox.Launcher], Awaitable[None]]) -> None:
    async def run() -> None:
        launcher = sandbox.Launcher()
        launcher.ensure()
        try:
            await asyncio.wait_for(body(launcher), 60)
        finally:
            launcher.close()

    asyncio.run(run())


async def finish(job: sandbox.JobProcess) -> tuple[int, bytes, bytes]:
    assert job.stdout is not None and job.stderr is not None
    out, err = await asyncio.gather(job.stdout.read(), job.stderr.read())
    return await job.wait(), out, err


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_output_exit_status_and_input_come_back() -> None:
    async def body(launcher: sandbox.Launcher) -> None:
        job = await launcher.start(launch("sh", "-c", "echo out; echo err >&2; exit 3"))
        assert await finish(job) == (3, b"out\n", b"err\n")
        cat = await launcher.start(launch("cat", stdin=True))
        assert cat.stdin is not None
        cat.stdin.write(b"through stdin\n")
        await cat.stdin.drain()
        cat.stdin.close()
        assert await finish(cat) == (0, b"through stdin\n", b"")
        killed = await launcher.start(launch("sh", "-c", "kill -TERM $$"))
        assert (await finish(killed))[0] == -signal.SIGTERM

    with_launcher(body)


def test_jobs_started_at_once_each_get_their_own_descriptors() -> None:
    """Requests and their descriptors travel separately over the socket; a pairing that
    slipped by one would show here as a job writing into another job's output."""

    async def body(launcher: sandbox.Launcher) -> None:
        jobs = await asyncio.gather(
            *(launcher.start(launch("sh", "-c", f"echo {i}; echo e{i} >&2")) for i in range(60))
        )
        results = await asyncio.gather(*(finish(job) for job in jobs))
        assert [r for r in results] == [
            (0, f"{i}\n".encode(), f"e{i}\n".encode()) for i in range(60)
        ]
        assert len({job.pid for job in jobs}) == 60

    with_launcher(body)


def test_a_job_holds_only_its_three_descriptors_and_leads_its_session() -> None:
    async def body(launcher: sandbox.Launcher) -> None:
        script = "ls /proc/$$/fd; ps -o sid= -p $$"
        job = await launcher.start(launch("sh", "-c", script))
        status, out, _ = await finish(job)
        lines = out.decode().split()
        assert status == 0
        assert sorted(lines[:-1], key=int) == ["0", "1", "2"], out  # not the launcher's socket
        assert int(lines[-1]) == job.pid

    with_launcher(body)


def test_failures_say_what_failed(tmp_path: Path) -> None:
    async def body(launcher: sandbox.Launcher) -> None:
        with pytest.raises(FileNotFoundError):
            await launcher.start(launch(str(tmp_path / "no-such-program")))
        with pytest.raises(FileNotFoundError):
            await launcher.start(launch("no-such-program-on-path"))
        with pytest.raises(PermissionError):
            (tmp_path / "plain").write_text("not a program")
            await launcher.start(launch(str(tmp_path / "plain")))
        if os.geteuid() == 0:
            missing = (str(tmp_path / "no-stage"), str(tmp_path))
            with pytest.raises(sandbox.SandboxError, match="private mount.*-p=false"):
                await launcher.start(launch("/bin/true", bind=missing))
        with pytest.raises(OSError, match="cannot start /bin/true: No such file.*gone"):
            await launcher.start(launch("/bin/true", cwd=str(tmp_path / "gone")))
        job = await launcher.start(launch("/bin/echo", "still serving"))
        assert await finish(job) == (0, b"still serving\n", b"")

    with_launcher(body)


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount as the slave makes it needs root")
def test_a_private_job_sees_its_stage_over_bin_root_and_nothing_leaks(tmp_path: Path) -> None:
    stage, bin_root = tmp_path / "stage", tmp_path / "bin"
    stage.mkdir()
    bin_root.mkdir()
    (stage / "mine").write_text("the job's file\n")

    async def body(launcher: sandbox.Launcher) -> None:
        job = await launcher.start(
            launch(
                "sh",
                "-c",
                f"cat {bin_root}/mine; touch {bin_root}/new",
                bind=(str(stage), str(bin_root)),
            )
        )
        assert await finish(job) == (0, b"the job's file\n", b"")

    with_launcher(body)
    assert list(bin_root.iterdir()) == [], "the mount was the job's alone"
    assert (stage / "new").exists()


def test_a_killed_launcher_takes_its_jobs_and_a_new_one_serves() -> None:
    async def body(launcher: sandbox.Launcher) -> None:
        job = await launcher.start(launch("sleep", "600"))
        first = launcher._proc
        assert first is not None
        first.kill()
        assert await job.wait() == -signal.SIGKILL
        await asyncio.to_thread(wait_until, lambda: not alive(job.pid), 30, "the job outlived it")
        again = await launcher.start(launch("/bin/echo", "again"))
        assert await finish(again) == (0, b"again\n", b"")
        assert launcher._proc is not None and launcher._proc.pid != first.pid

    with_launcher(body)


def test_closing_the_launcher_kills_the_jobs_it_started() -> None:
    pids: list[int] = []

    async def body(launcher: sandbox.Launcher) -> None:
        job = await launcher.start(launch("sh", "-c", "sleep 600 & sleep 600"))
        pids.append(job.pid)

    with_launcher(body)  # closes it
    wait_until(lambda: not alive(pids[0]), 30, "a job outlived its launcher's close")
    group = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pids[0]]
    wait_until(lambda: not any(alive(int(p)) for p in group), 30, "its background child lived")


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


SLAVE = """
import asyncio, sys
from gproc import sandbox
async def main():
    launcher = sandbox.Launcher()
    job = await launcher.start(sandbox.Launch(["sleep", "600"], {"PATH": "/bin:/usr/bin"}, "/"))
    print(launcher._proc.pid, job.pid, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_a_slave_killed_outright_leaves_no_launcher_and_no_job() -> None:
    """SIGKILL gives the slave no chance to clean up: the parent-death signals must."""
    root = str(Path(sandbox.__file__).resolve().parents[1])
    slave = subprocess.Popen(
        [sys.executable, "-c", SLAVE], stdout=subprocess.PIPE, text=True, cwd=root
    )
    try:
        assert slave.stdout is not None
        launcher, job = map(int, slave.stdout.readline().split())
        assert alive(launcher) and alive(job)
    finally:
        slave.kill()
        slave.wait()
    wait_until(lambda: not alive(job), 30, "the job outlived its slave")
    wait_until(lambda: not alive(launcher), 30, "the launcher outlived its slave")


def test_a_slave_gone_with_answers_unread_ends_the_launcher_quietly() -> None:
    """A slave whose end of the socket closes with the launcher's answers still unread (it
    was killed) makes the launcher's next read fail with ECONNRESET, not EOF: that left a
    traceback in a killed node's log. The launcher ends as on EOF, quietly, with its jobs."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        argv = [sys.executable, "-I", "-S", "-", spawner.NAME, str(theirs.fileno())]
        proc = subprocess.Popen(
            [*argv, str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(sandbox._SOURCE)
    try:
        first = _ask(ours, 1)
        size = spawner.LENGTH.size + int.from_bytes(first[:4], "big")
        answer = marshal.loads(first[spawner.LENGTH.size : size])
        assert answer[:2] == ("started", 1), answer
        _ask(ours, 2)  # its answer is left unread
        ours.close()
        assert proc.wait(30) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
        wait_until(lambda: not alive(answer[2]), 30, "a job outlived its launcher")
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ask(sock: socket.socket, tag: int) -> bytes:
    """Send the launcher a request for ``sleep 600``; what it answered, once it has, unread."""
    body = marshal.dumps(("run", tag, ["sleep", "600"], ENV, "/", None, None, None, None))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        fds = array.array("i", [null] * 3)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        sock.sendmsg([spawner.LENGTH.pack(len(body)) + body], rights)
    finally:
        os.close(null)
    readable, _, _ = select.select([sock], [], [], 30)
    assert readable, f"no answer to request {tag}"
    return sock.recv(4096, socket.MSG_PEEK) if tag > 1 else sock.recv(4096)
