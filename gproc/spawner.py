"""The launcher: a lean process beside each slave that forks and execs every job's program.

A fork copies the page tables of the process that forks, and the child's first writes copy
pages, both in proportion to what that process has mapped. The slave daemon has imported all
of gproc (asyncio, msgpack, ...; about 30 MB resident), so a job forked from it, with Python
code run between fork and exec to make the private mount, cost 3.4 ms of CPU per job on this
machine against 1.0 ms for a fork and exec from an interpreter that imported only what is
here (``bench/bench_launch.py`` gives the per-launch CPU of the daemons; on 80 nodes that is
80 times the difference). So a slave (unless given ``-launcher=false``) starts this module
once, as ``python -I -S - gproc-launcher SOCKET_FD PARENT_PID`` with this source on its
standard input, and hands it each job over a Unix socket: the request (argv, environment,
working directory, the private mount, the user) and the job's three standard descriptors
passed alongside (SCM_RIGHTS). The launcher forks; the child makes the job its own session,
makes the private mount, becomes the user and execs; the launcher answers with the pid, or
with why the program could not start, and later with its exit status, since the job is the
launcher's child.

Only the standard library's lightest modules are imported here, and nothing from gproc: the
same functions run in the slave too when it forks a job itself (with ``-launcher=false``).

The framing, both ways: a 4-byte big-endian length, then a ``marshal`` tuple. The socket is a
private socketpair between a root daemon and its own child, so marshal's trust in its input
is the daemon's trust in itself. Requests: ``("run", tag, argv, env, cwd, bind, lower, work,
user)`` with three descriptors; answers: ``("started", tag, pid)``, ``("failed", tag, step,
errno, text)`` and ``("exit", pid, wait_status)``.

The launcher asks for SIGKILL when the slave dies (``PR_SET_PDEATHSIG``), and every job asks
for the same when the launcher dies, so a killed slave still leaves no job behind; when the
slave closes the socket, the launcher kills what still runs and exits.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import os
import select
import signal
import socket
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
NAME = "gproc-launcher"  # in its command line, for ps
LENGTH = struct.Struct(">I")
MAX_REQUEST = 64 << 20  # argv and environment past the kernel's own limits are refused anyway

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong]
_libc.mount.argtypes += [ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

User = tuple  # (uid, gid, groups): who the job runs as, when not the daemon's user


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
        _overlay(lower, stage, work, bin_root)
        return
    _check(
        _libc.mount(stage.encode(), bin_root.encode(), None, MS_BIND | MS_REC, None),
        f"bind {stage} over {bin_root}",
    )


def _overlay(lower: str, stage: str, work: str, bin_root: str) -> None:
    """Mount an overlay of ``stage`` on ``lower`` over ``bin_root``, volatile where the
    kernel knows the option.

    A plain overlay syncs its whole upper filesystem when it is unmounted, which happens
    when the job's last process exits and its mount namespace goes. The upper layer is the
    job's staging, removed right after, so that sync buys nothing, and it made every job
    wait for every dirty page on binRoot's filesystem: an 8-node echo took 2-4 s while
    another job unpacked 50,000 files beside it, its processes waiting in the kernel for
    writeback (tests/test_flow.py). ``volatile`` (Linux 5.10) skips the sync; an older
    kernel refuses it (EINVAL) and gets the plain overlay.
    """
    options = f"lowerdir={lower},upperdir={stage},workdir={work}"
    target = bin_root.encode()
    ret = _libc.mount(b"overlay", target, b"overlay", 0, (options + ",volatile").encode())
    if ret != 0 and ctypes.get_errno() == errno.EINVAL:
        ret = _libc.mount(b"overlay", target, b"overlay", 0, options.encode())
    _check(ret, f"overlay {stage} over {bin_root}")


def become(uid: int, gid: int, groups: list[int] | tuple[int, ...]) -> None:
    """After the private mount is made as root: become the user, for good.

    Groups first, then gid, then uid: each step needs the privilege the next one drops. Then
    no-new-privileges, so no setuid program gives any of it back.
    """
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def child_setup(
    bind: tuple[str, str] | None,
    lower: str | None,
    work: str | None,
    user: User | None,
    cwd: str,
    parent: int,
) -> None:
    """Between fork and exec: the mount as root, then the user, then what the user may do.

    The parent-death signal is asked for after the drop, because changing the user clears it.
    A parent (``parent``: the pid that forked us) that died before we asked sends nothing:
    we would exec the job orphaned, with nobody to kill it or read it, while the daemon
    counts it as never started. So once asked, the child checks its parent is still there.
    """
    if bind is not None:
        enter_private_root(bind[0], bind[1], lower, work)
    if user is not None:
        become(*user)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise OSError(errno.ESRCH, "the process that forked the job is gone")
    os.chdir(cwd)


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """execve, searching the job's PATH for a bare name as the shell would; raises OSError.

    Not os.get_exec_path: it imports ``warnings``, and an import here, after the drop to the
    job's user, fails for a user who may not read the daemon's Python (under /root, say).
    Nothing between fork and exec may import.
    """
    if "/" in argv[0]:
        os.execve(argv[0], argv, env)
    first: OSError | None = None
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execve(os.path.join(directory, argv[0]), argv, env)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) and first is None:
                first = e
    raise first or OSError(errno.ENOENT, f"{argv[0]}: not found on PATH")


def _child(request: tuple, fds: list[int], report: int, parent: int) -> None:
    """The forked child: never returns; on failure writes (step, errno, text) to ``report``."""
    _, _, argv, env, cwd, bind, lower, work, user = request
    step = "setup"
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, report)
        os.closerange(report + 1, os.sysconf("SC_OPEN_MAX"))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)  # as a job forked by subprocess gets them
        signal.set_wakeup_fd(-1)
        child_setup(bind, lower, work, user, cwd, parent)
        step = "exec"
        _exec(argv, env)
    except BaseException as e:
        code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
        text = str(e)
        if isinstance(e, OSError) and e.strerror:
            text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        try:
            os.write(report, marshal.dumps((step, code, text)))
        finally:
            os._exit(127)
    os._exit(127)


def spawn(request: tuple, fds: list[int]) -> tuple[int, int]:
    """Fork the job of ``request`` with ``fds`` as its 0, 1, 2: its pid, and the read end
    of its report pipe (close-on-exec in the child: EOF once the program is exec'd, after
    (step, errno, text) if it could not be)."""
    report_r, report_w = os.pipe()
    me = os.getpid()
    try:
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            _child(request, fds, report_w, me)
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    os.set_blocking(report_r, False)  # a stale readiness must not wait on another child
    return pid, report_r


class Launcher:
    """The launcher's side of the socket: requests in, answers out, children reaped.

    A child's exec is awaited like everything else, in the one poll: between the drop to
    the user and the exec the child is the user's, who may stop it (SIGSTOP) for as long as
    she likes, and a blocking wait for its exec would hold up every other start on the node.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = bytearray()
        self.fds: list[int] = []  # received with requests not read yet, in order
        self.jobs: set[int] = set()
        self.starting: dict[int, tuple[object, int, bytearray]] = {}  # report fd: tag, pid, text
        self.poll = select.poll()

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes poll through the pipe
        signal.set_wakeup_fd(wake_w)
        self.poll.register(self.sock, select.POLLIN)
        self.poll.register(wake_r, select.POLLIN)
        try:
            while True:
                for fd, _ in self.poll.poll():
                    if fd == wake_r:
                        while os.read(wake_r, 512) == 512:
                            pass
                        self.reap()
                    elif fd in self.starting:
                        self.report(fd)
                    elif fd == self.sock.fileno() and not self.take():
                        return
        except (ConnectionResetError, BrokenPipeError):
            return  # the daemon closed its end with our answers unread (it was killed)
        finally:  # the daemon is gone: so is every job it started
            for _, pid, _ in self.starting.values():
                _kill(os.kill, pid)
            for pid in self.jobs:
                _kill(os.killpg, pid)

    def take(self) -> bool:
        """Read what arrived; start every complete request. False once the daemon is gone."""
        try:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
        except InterruptedError:
            return True
        if not data:
            return False
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                self.fds += list(struct.unpack(f"{usable // 4}i", payload[:usable]))
        self.inbox += data
        while len(self.inbox) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self.inbox)
            if size > MAX_REQUEST or len(self.inbox) < LENGTH.size + size:
                return size <= MAX_REQUEST
            request = marshal.loads(self.inbox[LENGTH.size : LENGTH.size + size])
            del self.inbox[: LENGTH.size + size]
            fds, self.fds = self.fds[:3], self.fds[3:]
            try:
                pid, report = spawn(request, fds)
            except OSError as e:  # a fork that failed (no memory, no pids)
                reason = e.strerror or str(e)
                self.send(("failed", request[1], "fork", e.errno or errno.EAGAIN, reason))
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            self.starting[report] = (request[1], pid, bytearray())
            self.poll.register(report, select.POLLIN)
        return True

    def report(self, fd: int, status: int | None = None) -> None:
        """The child's report pipe is readable: its failure, or EOF once exec'd or dead.

        ``status``: the child was reaped already (it died before we read the EOF).
        """
        tag, pid, failure = self.starting[fd]
        try:
            while chunk := os.read(fd, 4096):
                failure += chunk
        except BlockingIOError:
            return  # more, or the EOF, comes with a later poll
        del self.starting[fd]
        self.poll.unregister(fd)
        os.close(fd)
        if failure:  # it exits now; reap() takes it then, never reported as a job (a wait
            # here could block: after the drop to the user, she may stop it before it exits)
            step, code, text = marshal.loads(failure)
            self.send(("failed", tag, step, code, text))
            return
        self.send(("started", tag, pid))
        if status is None:
            self.jobs.add(pid)
        else:
            self.send(("exit", pid, status))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            report = next((fd for fd, (_, p, _) in self.starting.items() if p == pid), None)
            if report is not None:  # dead before we saw its exec: answer the start first
                self.report(report, status)
                continue
            if pid in self.jobs:
                self.jobs.discard(pid)
                self.send(("exit", pid, status))

    def send(self, answer: tuple) -> None:
        body = marshal.dumps(answer)
        self.sock.sendall(LENGTH.pack(len(body)) + body)


def _kill(how: object, pid: int) -> None:
    try:
        how(pid, signal.SIGKILL)  # type: ignore[operator]
    except OSError:
        pass


def main(sock_fd: int, parent: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the daemon died before we could ask
        return
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    Launcher(sock).serve()


if __name__ == "__main__":
    main(int(sys.argv[2]), int(sys.argv[3]))
