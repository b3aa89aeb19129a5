"""End to end on a local tree of 8 real daemons (rack size 4: n4 and n8 are rack masters)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Tree, is_root, labelled, start_tree, wait_until

from gproc.deploy.local import LocalTree

ALL = [f"n{i}" for i in range(1, 9)]


def test_all_nodes_print_labelled_lines(tree: Tree) -> None:
    r = tree.gproc("e", "./.", "/bin/sh", "-c", 'echo "I am $GPROC_NODE"')
    assert r.returncode == 0, r.stderr
    out = labelled(r.stdout)
    assert sorted(out) == sorted(ALL)
    for node, lines in out.items():
        assert lines == [f"I am {node}"]


def test_dot_selects_the_rack_masters(tree: Tree) -> None:
    r = tree.gproc("e", ".", "/bin/echo", "hi")
    assert r.returncode == 0, r.stderr
    assert sorted(labelled(r.stdout)) == ["n4", "n8"]


def test_rack_master_and_its_children(tree: Tree) -> None:
    r = tree.gproc("e", "1/.", "/bin/echo", "hi")
    assert r.returncode == 0, r.stderr
    assert sorted(labelled(r.stdout)) == ["n1", "n2", "n3", "n4"]


def test_sub_specs_pick_children(tree: Tree) -> None:
    r = tree.gproc("e", "1/2,2/1-2", "/bin/echo", "hi")
    assert r.returncode == 0, r.stderr
    assert sorted(labelled(r.stdout)) == ["n2", "n4", "n5", "n6", "n8"]


def test_shipped_files_are_visible(tree: Tree) -> None:
    data = tree.root / "data"
    data.mkdir(exist_ok=True)
    (data / "hello.txt").write_text("shipped words\n")
    r = tree.gproc("-f", str(data), "e", "./.", "/bin/cat", f"{data}/hello.txt")
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {n: ["shipped words"] for n in ALL}


def test_program_starts_in_the_recreated_cwd(tree: Tree) -> None:
    r = tree.gproc("e", "1", "/bin/pwd")
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {"n4": [str(tree.bin_root / "n4") + str(tree.root)]}


def test_largest_exit_status_wins(tree: Tree) -> None:
    r = tree.gproc("e", "./.", "/bin/sh", "-c", '[ "$GPROC_NODE" = n6 ] && exit 3; exit 0')
    assert r.returncode == 3
    assert "exit status 3 on n6" in r.stderr


def test_signal_gives_128_plus_signal(tree: Tree) -> None:
    r = tree.gproc("e", "2", "/bin/sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM


def test_fold_groups_identical_output(tree: Tree) -> None:
    r = tree.gproc("-b", "e", "./.", "/bin/echo", "same")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "n[1-8]: same\n"


def test_raw_output_is_unlabelled(tree: Tree) -> None:
    r = tree.gproc("-raw", "e", "1/1", "/bin/echo", "plain")
    assert r.stdout.splitlines() == ["plain", "plain"]


def test_missing_program_is_a_clear_error(tree: Tree) -> None:
    r = tree.gproc("e", "./.", "no-such-program-xyz")
    assert r.returncode == 1
    assert "no-such-program-xyz" in r.stderr
    assert "Traceback" not in r.stderr


def test_spec_selecting_nothing_live(tree: Tree) -> None:
    r = tree.gproc("e", "7", "/bin/true")
    assert r.returncode != 0
    assert "selects no live node" in r.stderr


def test_unreachable_ids_are_reported(tree: Tree) -> None:
    r = tree.gproc("e", "1-3", "/bin/true")
    assert r.returncode == 255
    assert "unreachable: id 3 under master (no such node)" in r.stderr


def test_info_shows_the_whole_tree(tree: Tree) -> None:
    r = tree.gproc("i")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:-1]]
    assert [row[:2] for row in rows] == [
        ["-", "master"],
        ["1", "n4"],
        ["1/1", "n1"],
        ["1/2", "n2"],
        ["1/3", "n3"],
        ["2", "n8"],
        ["2/1", "n5"],
        ["2/2", "n6"],
        ["2/3", "n7"],
    ]
    assert all(row[-1] == "up" for row in rows)


def leftovers(tree: Tree) -> list[str]:
    """Everything under any node's binRoot or staging directory (its cache aside)."""
    found = []
    for top in tree.bin_root.iterdir():
        if top.name.endswith(".cache"):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return found


def cached_names(tree: Tree) -> set[str]:
    """Names in the nodes' caches: blobs, and the shared trees (gproc.trees) in ``trees``."""
    blobs = {p.name for p in tree.bin_root.glob("*.cache/*") if p.name != "trees"}
    return blobs | {p.name for p in tree.bin_root.glob("*.cache/trees/*")}


@pytest.mark.skipif(not is_root, reason="private mounts as tested here need root (CI runs as root)")
def test_private_mount_leaves_nothing(tree: Tree) -> None:
    stage_files = tree.root / "pfiles"
    stage_files.mkdir(exist_ok=True)
    (stage_files / "x").write_text("x")
    r = tree.gproc(
        "-f",
        str(stage_files),
        "e",
        "./.",
        "/bin/sh",
        "-c",
        'touch "$PWD/written-by-job" && ls "$PWD"',
    )
    assert r.returncode == 0, r.stderr
    assert all(lines == ["pfiles", "written-by-job"] for lines in labelled(r.stdout).values())
    assert leftovers(tree) == []
    assert all(len(name) == 64 for name in cached_names(tree)), "only hashes: of blobs, of trees"


def test_without_private_mount_files_stay(own_tree: Tree) -> None:
    r = own_tree.gproc("-p=false", "e", "1", "/bin/true")
    assert r.returncode == 0, r.stderr
    kept = own_tree.bin_root / "n4"
    assert (kept / "bin" / "true").exists() or (kept / "usr" / "bin" / "true").exists()
    assert (kept / str(own_tree.root).lstrip("/")).is_dir()


class HeldJob:
    """A job that marks when it runs on a node, then waits for the test's go to finish.

    A fault meant to hit a running job is injected once every node has started it, and the
    job ends when the test says so: no guess of how long starting takes on a loaded machine.
    """

    def __init__(self, where: Path):
        where.mkdir()
        self.where = where

    def argv(self) -> list[str]:
        w = self.where
        script = (
            f'touch "{w}/started.$GPROC_NODE"; '
            f'while [ ! -e "{w}/go" ]; do sleep 0.05; done; echo finished'
        )
        return ["/bin/sh", "-c", script]

    def started(self) -> set[str]:
        return {p.suffix[1:] for p in self.where.glob("started.*")}

    def wait_started(self, nodes: list[str]) -> None:
        wait_until(self.started, 30, "the job to start on every node", lambda s: s >= set(nodes))

    def go(self) -> None:
        (self.where / "go").touch()


@contextlib.contextmanager
def held_job(tree: Tree, spec: str) -> Iterator[tuple[HeldJob, subprocess.Popen]]:
    """Run a HeldJob on ``spec``; however the test ends, the job is let go and gproc is gone."""
    job = HeldJob(tree.root / "held")
    client = tree.popen("e", spec, *job.argv())
    try:
        yield job, client
    finally:
        job.go()
        if client.poll() is None:  # the test failed before gproc ended
            client.kill()
        client.communicate()


def test_killed_slave_is_reported_lost(own_tree: Tree) -> None:
    with held_job(own_tree, "./.") as (job, client):
        job.wait_started(ALL)
        os.kill(own_tree.pid("n6"), signal.SIGKILL)
        job.go()
        out, err = client.communicate(timeout=30)
    assert client.returncode == 255
    assert "lost n6" in err
    finished = labelled(out)
    assert sorted(finished) == sorted(n for n in ALL if n != "n6")
    after = own_tree.gproc("e", "2/.", "/bin/true")
    assert after.returncode == 255, "a lost node that the spec covers is not skipped silently"
    assert "unreachable: n6 (lost)" in after.stderr
    assert own_tree.gproc("e", "2/1,2/3", "/bin/true").returncode == 0


def test_killed_rack_master_loses_its_rack(own_tree: Tree) -> None:
    with held_job(own_tree, "./.") as (job, client):
        job.wait_started(ALL)
        os.kill(own_tree.pid("n8"), signal.SIGKILL)
        job.go()
        out, err = client.communicate(timeout=30)
    assert client.returncode == 255
    assert "lost n[5-8]" in err
    assert sorted(labelled(out)) == ["n1", "n2", "n3", "n4"]
    again = own_tree.gproc("e", "1/.", "/bin/echo", "still here")
    assert again.returncode == 0, again.stderr


def running(tree: Tree, last_arg: str) -> dict[str, int]:
    """Node -> pid of this tree's job processes whose last argument is ``last_arg``.

    A job runs as ``BINROOT/nN/lib64/ld-linux... BINROOT/nN/bin/prog ARGS``; matching on this
    tree's binRoot keeps out the same test run by another worker or another checkout.
    """
    prefix = f"{tree.bin_root}/"
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if len(args) > 1 and args[0].startswith(prefix) and args[-1] == last_arg:
            found[args[0][len(prefix) :].partition("/")[0]] = int(pid)
    return found


@contextlib.contextmanager
def sigint_as_from_a_terminal() -> Iterator[None]:
    """Children started inside take SIGINT at its default, as from a terminal's Ctrl-C.

    A test run started in the background by a non-interactive shell (``tox &``, a CI step)
    inherits SIGINT ignored, and a gproc started from it would rightly ignore it too. A
    disposition set to a handler is reset to the default by exec, so the child starts with
    Python's KeyboardInterrupt whatever this process inherited.
    """
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_kills_the_job_everywhere(tree: Tree) -> None:
    tag = "4242.5"
    with sigint_as_from_a_terminal():
        client = tree.popen("e", "./.", "/bin/sleep", tag)
    wait_until(lambda: running(tree, tag), 20, "sleep on every node", lambda r: len(r) == 8)
    client.send_signal(signal.SIGINT)
    client.communicate(timeout=10)
    assert client.returncode == 130
    wait_until(lambda: running(tree, tag), 10, "no sleep left on any node", lambda r: not r)
    assert tree.gproc("e", "./.", "/bin/true").returncode == 0


def test_paused_slave_is_reported_lost(tmp_path) -> None:
    """A frozen node still ACKs at the TCP level; the heartbeat is what finds it out."""
    tree = start_tree(tmp_path / "tree", heartbeat=0.25)
    try:
        with held_job(tree, "./.") as (job, client):
            job.wait_started(ALL)
            os.kill(tree.pid("n6"), signal.SIGSTOP)
            job.go()
            out, err = client.communicate(timeout=30)
        assert client.returncode == 255
        assert "lost n6" in err
        assert sorted(labelled(out)) == sorted(n for n in ALL if n != "n6")
    finally:
        with contextlib.suppress(AssertionError, ProcessLookupError):
            os.kill(tree.pid("n6"), signal.SIGCONT)
        tree.launcher.down()


GREET_C = 'const char *greeting(void) { return "hello from libgreet"; }\n'
HELLO_C = """#include <stdio.h>
const char *greeting(void);
int main(int argc, char **argv) {
    printf("%s (%s)\\n", greeting(), argc > 1 ? argv[1] : "-");
    return 0;
}
"""


def build_app(prefix: Path) -> Path:
    """prefix/bin/hello needs prefix/lib/libgreet.so, found only through RUNPATH=$ORIGIN/../lib."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (apt install gcc)")
    (prefix / "lib").mkdir(parents=True)
    (prefix / "bin").mkdir()
    (prefix / "greet.c").write_text(GREET_C)
    (prefix / "hello.c").write_text(HELLO_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", prefix / "lib" / "libgreet.so", prefix / "greet.c"],
        check=True,
    )
    subprocess.run(
        [
            "gcc",
            "-o",
            prefix / "bin" / "hello",
            prefix / "hello.c",
            f"-L{prefix / 'lib'}",
            "-lgreet",
            "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib",
        ],
        check=True,
    )
    return prefix / "bin" / "hello"


def test_runpath_program_runs_on_every_node(tree: Tree) -> None:
    hello = build_app(tree.root / "app")
    r = tree.gproc("e", "./.", str(hello), "arg")
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {n: ["hello from libgreet (arg)"] for n in ALL}


def test_program_from_another_root(tree: Tree) -> None:
    """-r: the program, its loader and its libraries come from a root the host does not use."""
    root = tree.root / "otherroot"
    build_app(root / "opt" / "app")
    for lib in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6"):
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(lib), dest)
    assert not Path("/opt/app/bin/hello").exists()
    r = tree.gproc("-r", str(root), "e", "1/.", "/opt/app/bin/hello")
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {n: ["hello from libgreet (-)"] for n in ("n1", "n2", "n3", "n4")}


def test_localbin_runs_the_nodes_own_program(tree: Tree) -> None:
    r = tree.gproc("-localbin", "e", "2/.", "sh", "-c", 'echo "$0 on $GPROC_NODE"')
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {n: [f"sh on {n}"] for n in ("n5", "n6", "n7", "n8")}


def test_ldenv_runs_through_library_path(tree: Tree) -> None:
    hello = tree.root / "app" / "bin" / "hello"
    if not hello.exists():
        build_app(tree.root / "app")
    r = tree.gproc("-ldenv", "e", "1", str(hello))
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {"n4": ["hello from libgreet (-)"]}


def test_a_client_that_stops_reading_does_not_cost_the_rack(tmp_path: Path) -> None:
    """Backpressure from a stalled reader is not silence: no node is dropped for it."""
    tree = start_tree(tmp_path / "tree", heartbeat=0.25)
    try:
        client = tree.popen("e", "1/1", "/usr/bin/yes")  # stdout piped, never read
        pipe = client.stdout.fileno()
        size = fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ)
        wait_until(
            lambda: int.from_bytes(fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4), "little"),
            30,
            f"gproc's stdout pipe ({size} bytes) to fill: the reader has stalled",
            lambda unread: unread >= size - 4096,
        )
        # The claim is that nothing happens while the stall lasts: no node is dropped over
        # 12 heartbeats (4 silent beats drop a peer), checked throughout, not only at the end.
        hold = time.monotonic() + 12 * 0.25
        while time.monotonic() < hold:
            info = tree.gproc("i")
            assert info.stdout.splitlines()[-1] == "8 nodes below master: 8 up, 0 lost"
        client.kill()
        client.wait()
        assert tree.gproc("e", "./.", "/bin/true").returncode == 0
        assert all(tree.launcher.pid(n) for n in ALL)
    finally:
        tree.launcher.down()


def test_cancel_right_after_the_plan_kills_every_program(tree: Tree) -> None:
    """The client goes away while nodes are still starting the program."""
    import socket as sockets

    from gproc.client import BlockingConn, ExecOptions, build_job
    from gproc.protocol import Need

    tag = "4343.5"
    tree.gproc("e", "./.", "/bin/sleep", "0")  # the program is cached on every node now
    header, _ = build_job(ExecOptions(spec="./.", argv=["/bin/sleep", tag]))
    for _ in range(3):
        sock = sockets.socket(sockets.AF_UNIX)
        sock.connect(tree.uds)
        conn = BlockingConn(sock)
        conn.send(header)
        while (frame := conn.recv()) is not None and type(frame) is not Need:
            pass
        conn.close()
    wait_until(lambda: running(tree, tag), 10, "no sleep left on any node", lambda r: not r)


def test_a_child_with_a_malformed_subtree_is_dropped(tree: Tree) -> None:
    import asyncio

    from gproc import wire
    from gproc.keys import load_key
    from gproc.protocol import Register
    from gproc.session import handshake
    from gproc.stream import Conn

    async def register() -> None:
        reader, writer = await wire.open_connection("127.0.0.1", tree.launcher.settings.cmdport)
        conn = Conn(reader, writer)
        await handshake(conn, load_key(tree.launcher.settings.key), dialer=True, role="slave")
        await conn.send(Register(9, "odd", "x:1", [{"id": 1, "state": "up"}]))  # type: ignore[list-item]
        assert await conn.recv() is None  # the master closes it without a word
        await conn.close()

    asyncio.run(register())
    info = tree.gproc("i")
    assert info.returncode == 0 and "odd" not in info.stdout, info.stderr
    assert tree.gproc("e", "./.", "/bin/true").returncode == 0


def test_a_stopped_node_is_forgotten_not_lost(own_tree: Tree) -> None:
    os.kill(own_tree.pid("n6"), signal.SIGTERM)
    wait_until(
        lambda: own_tree.gproc("i").stdout, 10, "n6 to leave the tree", lambda s: "n6" not in s
    )
    r = own_tree.gproc("e", "2/.", "/bin/true")
    assert r.returncode == 0, r.stderr


def test_a_reader_that_leaves_ends_gproc_quietly(tree: Tree) -> None:
    switches = " ".join(tree.switches())
    script = (
        f"{sys.executable} -m gproc {switches} e 1 /usr/bin/seq 200000 | head -1; "
        'echo "status ${PIPESTATUS[0]}" >&2'
    )
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=tree.root
    )
    assert r.stdout == "n4: 1\n"
    assert r.stderr.strip().splitlines() == [f"status {128 + signal.SIGPIPE}"]


def test_only_the_masters_user_may_connect_by_default(tree: Tree) -> None:
    """-allow owner (the default): the socket is 0600, as a personal tree's should be."""
    assert os.stat(tree.uds).st_mode & 0o777 == 0o600


class WithoutLauncher(LocalTree):
    """Starts the slaves with -launcher=false."""

    def _gproc(self, *mode: str) -> list[str]:
        argv = super()._gproc(*mode)
        return [*argv[:-1], "-launcher=false", argv[-1]] if argv[-1] == "s" else argv


def test_jobs_are_forked_by_the_launcher_not_the_slave(tree: Tree) -> None:
    """Each slave forks its jobs from a lean launcher process (gproc.spawner), whose own
    parent is the slave: a job's parent is that launcher on every node."""
    _check_parents(tree, launcher=True)


def test_without_launcher_the_slave_forks_its_jobs(tmp_path: Path) -> None:
    without = start_tree(tmp_path / "without", launcher=WithoutLauncher)
    try:
        _check_parents(without, launcher=False)
    finally:
        without.launcher.down()


def _check_parents(tree: Tree, launcher: bool) -> None:
    script = 'tr "\\0\\n" "  " < /proc/$PPID/cmdline; echo; ps -o ppid= -p $PPID'
    r = tree.gproc("e", "./.", "/bin/sh", "-c", script)
    assert r.returncode == 0, r.stderr
    lines: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        node, _, text = line.partition(": ")
        lines.setdefault(node, []).append(text.strip())
    assert set(lines) == set(ALL)
    for node, (cmdline, grandparent) in lines.items():
        if launcher:
            assert "-I -S - gproc-launcher" in cmdline, (node, cmdline)
            assert int(grandparent) == tree.pid(node), node
        else:
            assert "gproc-launcher" not in cmdline and f"-myId {node[1:]} " in cmdline, cmdline
            assert cmdline.endswith(" s"), cmdline
