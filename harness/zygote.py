"""The netns backend's zygote: one Python that has imported gproc and forks every daemon.

A thousand slaves started as a thousand ``python -m gproc`` would each pay an interpreter
start (~0.1 s of CPU) and keep their own copy of every imported module (~20 MiB each). The
zygote imports gproc once, freezes what it holds out of the garbage collector's reach
(``gc.freeze``: a collection in a child then never writes to those pages), and forks. Each
child enters its node's network namespace, takes a UTS namespace of its own with the node's
hostname, points its output at the node's log and calls ``gproc.cli.main`` with the switches a
real ``gproc s`` (or ``gproc m``) would get: the same entry point and code path as the command,
only the imports are already done. The pages of the imported code and objects stay shared
copy-on-write between all the daemons.

The zygote serves requests on a Unix socket, one JSON object per connection (``spawn``: a
list of daemons to fork, with an open descriptor of each one's network namespace passed
alongside (SCM_RIGHTS), answered with their pids; ``list``: the live daemons; ``quit``), and
reaps its children.

The zygote and its daemons live in a mount namespace of their own, made private, in which
``/run/netns`` (where ``ip netns`` pins a thousand namespaces with a thousand bind mounts) is
unmounted. A private job (``-p``) gets a new mount namespace, which is a copy of its daemon's:
with the host's table that copy held every netns mount of the cluster, and 1,000 jobs copying
1,000 mounts each made a launch on 1,000 nodes take seconds of kernel time. A real node has
no such mounts either. That is why namespaces come as descriptors opened by the harness,
not as paths: the paths are empty files in the zygote's view.

The zygote runs in its own session, so the harness command that started it may exit (or
crash) and the cluster stays up; ``down`` finds it (and the daemons, which keep its command
line) by that command line.

Run as ``python -m harness.zygote --name CLUSTER --socket PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback

from gproc.spawner import CLONE_NEWNS, MS_PRIVATE, MS_REC, _check, _libc

CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
HIDDEN = ("/run/netns", "/var/run/netns", "/run/docker/netns")  # pinned namespaces
MAX_FDS = 200  # namespaces per spawn request (the kernel passes at most 253 at once)
MARK = "harness.zygote"  # in the command line: how ``down`` finds a zygote left behind

_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]  # the spawner's libc, one more call


def preload() -> None:
    """Import what a daemon imports, then keep it out of every later collection."""
    import asyncio  # noqa: F401
    import concurrent.futures.thread  # noqa: F401  (asyncio.to_thread's pool)

    import gproc.cli  # noqa: F401
    import gproc.commands  # noqa: F401
    import gproc.locales.kane  # noqa: F401
    import gproc.locales.static  # noqa: F401
    import gproc.master  # noqa: F401
    import gproc.slave  # noqa: F401

    gc.collect()
    gc.freeze()


def own_mounts() -> None:
    """A private mount namespace without the mounts that pin network namespaces (module doc)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    hidden = [p for p in points if any(p == h or p.startswith(h + "/") for h in HIDDEN)]
    for point in sorted(set(hidden), key=len, reverse=True):
        _libc.umount2(point.encode(), MNT_DETACH)  # an outer one may have taken it already


def become(proc: dict, netns: int) -> int:
    """In the forked child: enter the node's namespaces, then be ``gproc`` with its argv."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    _check(_libc.setns(netns, CLONE_NEWNET), f"setns {proc['netns']}")
    os.close(netns)
    _check(_libc.unshare(CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    socket.sethostname(proc["hostname"])
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(proc["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    from gproc.cli import main

    sys.argv = ["gproc", *proc["argv"]]
    return main(proc["argv"])


def fork_daemon(proc: dict, netns: int, keep: list[socket.socket]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sock in keep:
            sock.close()
        code = become(proc, netns)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Zygote:
    def __init__(self, path: str):
        self.path = path
        self.children: dict[int, str] = {}  # pid -> host
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        os.chmod(path, 0o600)
        self.server.listen(64)
        self.running = True

    def reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.pop(pid, None)

    def handle(self, request: dict, conn: socket.socket, fds: list[int]) -> dict:
        op = request.get("op")
        if op == "spawn":
            if len(fds) != len(request["procs"]):
                return {"error": f"{len(request['procs'])} daemons, {len(fds)} namespaces"}
            pids = {}
            for proc, fd in zip(request["procs"], fds, strict=True):
                pid = fork_daemon(proc, fd, [self.server, conn])
                self.children[pid] = proc["host"]
                pids[proc["host"]] = pid
            return {"pids": pids}
        if op == "list":
            self.reap()
            return {"pids": {host: pid for pid, host in self.children.items()}}
        if op == "quit":
            self.running = False
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    def serve(self) -> None:
        while self.running:
            self.reap()
            ready, _, _ = select.select([self.server], [], [], 0.5)
            if not ready:
                continue
            conn, _ = self.server.accept()
            fds: list[int] = []
            with conn:
                try:
                    conn.settimeout(30)
                    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, MAX_FDS + 1)
                    while data and not data.endswith(b"\n"):
                        chunk = conn.recv(1 << 20)
                        if not chunk:
                            break
                        data += chunk
                    reply = self.handle(json.loads(data), conn, fds)
                except (ValueError, KeyError, OSError) as error:
                    reply = {"error": f"{type(error).__name__}: {error}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def request(path: str, message: dict, timeout: float = 120, fds: list[int] = ()) -> dict:
    """Send one request (and descriptors) to a zygote and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        data = json.dumps(message).encode() + b"\n"
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):  # an empty send after the zygote answered would be EPIPE
            sock.sendall(data[sent:])
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if "error" in reply:
        raise OSError(f"zygote: {reply['error']}")
    return reply


def main() -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MARK}")
    p.add_argument("--name", required=True, help="the cluster (for ps and for down)")
    p.add_argument("--socket", required=True)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    own_mounts()
    preload()
    Zygote(args.socket).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
