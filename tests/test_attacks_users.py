"""Attacks by local users who have no cluster key, on a tree run by root with -allow all.

Like tests/test_users.py, these create users for the test (and remove them afterwards), run
real daemons as root, and act as those users from a copy of gproc's code with the system's
Python. They need root and the shadow tools; they skip, saying so, where either is missing.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Tree, assert_clean_logs, free_port_block, start_tree, wait_until
from test_users import USERS_GROUP, Place, User, as_user, lines_of, place, users

from gproc.deploy.local import LocalTree

FIXTURES = (place, users)  # test_users' module fixtures: two users, a site they can run

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("unshare"),
        reason="needs root, useradd and unshare: the test creates users and runs a tree as root",
    ),
    USERS_GROUP,
]


# ---------------------------------------------------------------- binRoot squatted


@pytest.fixture
def sticky(place: Place) -> Iterator[Path]:
    """A directory like /tmp: everybody may create in it, nobody may touch others' entries."""
    where = Path(tempfile.mkdtemp(dir=place.root))
    where.chmod(0o1777)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def start_slave(where: Path, bin_root: Path) -> subprocess.Popen:
    """A node daemon (n1 of the local locale) as root, with no master: it waits for one."""
    port = free_port_block(1)
    argv = [sys.executable, "-m", "gproc", "-locale", "local", "-myId", "1"]
    argv += ["-cmdport", str(port), "-key", str(where / "key"), "-binRoot", str(bin_root), "s"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def refused(where: Path, bin_root: Path) -> str:
    proc = start_slave(where, bin_root)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err
    return err


def test_a_node_refuses_a_bin_root_another_user_can_swap(
    sticky: Path, users: tuple[User, User, str]
) -> None:
    """The first to create /tmp/xproc (binRoot's parent under the local locale) owns the
    places where root writes jobs' files and hands staging trees to their users; renaming
    a staging directory for a symlink then got root to write into, and chown to the job's
    user, any directory of the node. A node now refuses such a binRoot, naming the culprit."""
    b = users[1]
    squatted = sticky / "xproc"
    squatted.mkdir()
    os.chown(squatted, b.uid, b.gid)  # b was first
    err = refused(sticky, squatted)
    assert f"{squatted} belongs to uid {b.uid} ({b.name})" in err, err
    assert not (squatted / "n1.stage").exists(), "nothing made in b's directory"

    squatted.rmdir()
    (sticky / "xproc").mkdir()  # root's own, but b got in beside it first
    (sticky / "xproc" / "n1.stage").mkdir()
    os.chown(sticky / "xproc" / "n1.stage", b.uid, b.gid)
    err = refused(sticky, sticky / "xproc")
    assert f"n1.stage belongs to uid {b.uid} ({b.name})" in err, err

    shutil.rmtree(sticky / "xproc")
    (sticky / "xproc").mkdir(mode=0o777)
    os.chmod(sticky / "xproc", 0o777)  # root's, but anybody may rename in it
    err = refused(sticky, sticky / "xproc")
    assert f"{sticky / 'xproc'} is writable by other users and not sticky" in err, err

    os.chown(sticky / "xproc", 0, grp.getgrnam(users[2]).gr_gid)
    os.chmod(sticky / "xproc", 0o775)  # root's, but a users' group may rename in it
    err = refused(sticky, sticky / "xproc")
    assert f"{sticky / 'xproc'} is writable by other users and not sticky" in err, err

    os.chown(sticky / "xproc", 0, 0)
    os.chmod(sticky / "xproc", 0o755)
    (sticky / "elsewhere").mkdir()
    os.symlink(sticky / "elsewhere", sticky / "xproc" / "n1.cache")
    err = refused(sticky, sticky / "xproc")
    assert "n1.cache is a symlink, not a directory" in err, err


def test_the_master_refuses_a_socket_directory_another_user_owns(
    sticky: Path, users: tuple[User, User, str]
) -> None:
    """The master binds its socket, then chowns and chmods it by name (0666 for -allow all):
    in a directory another user owns (/tmp/gproc/ made by her first), she could swap the name
    for a symlink between the bind and the chmod and have root make any file 0666, or
    replace the socket later. The master now refuses such a directory, naming its owner."""
    b = users[1]
    squatted = sticky / "gproc"
    squatted.mkdir()
    os.chown(squatted, b.uid, b.gid)
    port = free_port_block(1)
    r = subprocess.run(
        [sys.executable, "-m", "gproc", "-key", str(sticky / "key"), "-cmdport", str(port)]
        + ["-allow", "all", "-defaultMasterUDS", str(squatted / "sock"), "m"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1, r.stderr
    assert f"{squatted} belongs to uid {b.uid} ({b.name})" in r.stderr, r.stderr
    assert "-defaultMasterUDS" in r.stderr
    assert list(squatted.iterdir()) == [], "no socket made in her directory"


def test_a_bin_root_root_made_in_a_sticky_directory_is_fine(sticky: Path) -> None:
    """/tmp/xproc made by root (the default) stays usable: /tmp is sticky."""
    proc = start_slave(sticky, sticky / "xproc")
    try:
        cache = sticky / "xproc" / "n1.cache"  # root's alone once the node has set it up

        def ready() -> bool:
            return proc.poll() is not None or (cache.is_dir() and cache.stat().st_mode == 0o40700)

        wait_until(ready, 30, "the node to set up its cache")
        assert proc.poll() is None, proc.communicate()[1]
        assert (sticky / "xproc" / "n1.stage").stat().st_mode & 0o777 == 0o711
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- a flood of signals

COUNT_SIGNALS = """
import os, signal, sys, time
got = 0
def count(signum, frame):
    global got
    got += 1
signal.signal(signal.SIGUSR1, count)
print("up", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print(got, flush=True)
"""

FLOOD = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from gproc import client
from gproc.protocol import Done, Need, Out, Signal, frame_bytes

uds, python, counter, go = sys.argv[2:6]
opts = client.ExecOptions(
    spec="./.", argv=[python, "-c", counter, go], uds=uds, localbin=True, export="NONE"
)
header, manifest = client.build_job(opts)
conn = client.connect(uds)
conn.send(header)
sender, up = client.Sender(conn, manifest), 0
while up < 8:
    frame = conn.recv()
    if type(frame) is Need:
        sender.start(frame.files)
    elif type(frame) is Out:
        up += 1
print("flooding", flush=True)
one = frame_bytes(Signal("", 10))

def flood():
    try:
        while True:
            conn.sock.sendall(one * 100)
    except OSError:
        pass

threading.Thread(target=flood, daemon=True).start()
while type(frame := conn.recv()) is not Done:
    if type(frame) is Out:
        print(frame.node, frame.data.decode().strip(), flush=True)
"""


def test_a_flood_of_signals_is_relayed_at_a_bounded_rate(
    place: Place, users: tuple[User, User, str]
) -> None:
    """Signals a client passes on cost a frame on every link of its job and a kill() on every
    node: a client writing them as fast as it can held up everybody's jobs for tens of seconds
    on the local tree. The master now relays at most one every 10 ms per job."""
    b = users[1]
    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), nodes=8, allow="all")
    go = place.root / f"go-{os.urandom(4).hex()}"
    try:
        os.chmod(t.root, 0o755)
        flooder = subprocess.Popen(
            [place.python, "-s", "-c", FLOOD, str(place.site), t.uds, place.python]
            + [COUNT_SIGNALS, str(go)],
            user=b.uid,
            group=b.gid,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert flooder.stdout.readline().strip() == "flooding", flooder.stderr.read()
        began = time.monotonic()
        wait_until(lambda: time.monotonic() - began > 3, 10, "three seconds of flood")
        go.touch()
        out, err = flooder.communicate(timeout=60)
        seconds = time.monotonic() - began
        counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
        assert set(counts) == {f"n{i}" for i in range(1, 9)}, out + err
        most = seconds * 100 + 10  # gproc.master.SIGNAL_INTERVAL: 10 ms
        assert all(n <= most for n in counts.values()), f"{counts} in {seconds:.1f}s"
        other = time.monotonic()
        r = t.gproc("e", "./.", "/bin/true")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - other < 10, "nothing of the flood is left to hold up others"
    finally:
        go.unlink(missing_ok=True)
        t.launcher.down()
    assert_clean_logs(t)


# ---------------------------------------------------------------- the group a job runs with


class WithOwnGroups(LocalTree):
    """Starts chosen nodes in their own mount namespace, seeing their own /etc/group.

    As in test_users.WithOwnPasswd, the whole of /etc is a copy: a mount on /etc/group
    itself is detached the moment a groupadd or useradd renames a new file over the host's.
    """

    group: dict[str, Path] = {}

    def _gproc(self, *mode: str) -> list[str]:
        argv = super()._gproc(*mode)
        node = f"n{mode[1]}" if mode[:1] == ("-myId",) else None
        if node not in self.group:
            return argv
        etc = self.group[node].with_suffix(".etc")
        shutil.copytree("/etc", etc, symlinks=True, dirs_exist_ok=True)
        shutil.copyfile(self.group[node], etc / "group")
        mount = 'mount --bind "$0" /etc && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", mount, str(etc), *argv]


def test_a_group_the_user_lacks_on_a_node_is_refused_there(
    place: Place, users: tuple[User, User, str]
) -> None:
    """The master stamps the client's gid (from the kernel) into the job, and nodes used to
    take it as it came: a user in group G on the front-end (after newgrp G, say) ran with G on
    a node whose own group database does not make her a member, as a uid that is someone
    else's there would have run before the uid was checked. Now that node refuses, saying
    why; nodes where she is in G run the job with G."""
    a, _, group = users
    gid = grp.getgrnam(group).gr_gid
    lines = Path("/etc/group").read_text().splitlines(keepends=True)
    without = place.root / "group-without-a"
    without.write_text(
        "".join(f"{group}:x:{gid}:\n" if line.startswith(f"{group}:") else line for line in lines)
    )

    class Launcher(WithOwnGroups):
        group = {"n3": without}

    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), allow="all", launcher=Launcher)
    try:
        os.chmod(t.root, 0o755)
        code = (
            f"import sys; sys.path.insert(0, {str(place.site)!r}); "
            "from gproc.cli import main; sys.exit(main())"
        )
        r = subprocess.run(
            [place.python, "-s", "-c", code, *t.switches(), "e", "./.", "/usr/bin/id", "-g"],
            user=a.uid,
            group=gid,  # as after 'newgrp G' on the front-end, where a is in G
            extra_groups=[a.gid, gid],
            cwd=a.home,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 126, r.stdout + r.stderr
        assert lines_of(r.stdout) == {f"n{i}": str(gid) for i in range(1, 9) if i != 3}
        errors = lines_of(r.stderr)
        assert f"group {gid} is not one of {a.name}'s groups on n3" in errors["n3"], r.stderr
        mine = as_user(a, place, *t.switches(), "e", "./.", "/usr/bin/id", "-g")
        assert mine.returncode == 0, mine.stderr
        assert set(lines_of(mine.stdout).values()) == {str(a.gid)}, "her own group: everywhere"
    finally:
        t.launcher.down()
    assert_clean_logs(t)


# ---------------------------------------------------------------- a user holding every fd

MASTER_FDS = 256  # as a master started with a low limit (systemd's default soft limit: 1024)


class FewFds(LocalTree):
    """Starts the master with MASTER_FDS file descriptors."""

    def _gproc(self, *mode: str) -> list[str]:
        argv = super()._gproc(*mode)
        if mode != ("m",):
            return argv
        return ["sh", "-c", f'ulimit -n {MASTER_FDS} && exec "$@"', "sh", *argv]


HOLD = """
import select, socket, sys, time
held, said, start = [], False, time.monotonic()
while True:  # every connection the master takes, and a full backlog, for as long as it runs
    if not said and time.monotonic() > start + 3:
        print("holding", len(held), flush=True)
        said = True
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(sys.argv[1])  # and never a word: a job's connection may last as long
    except BlockingIOError:
        s.close()
        time.sleep(0.01)
        continue
    held.append(s)
    closed, _, _ = select.select(held, [], [], 0)  # refused: let go, try again
    for c in closed:
        held.remove(c)
        c.close()
    if closed:
        time.sleep(0.01)
"""


def test_one_user_cannot_hold_every_connection_of_the_master(
    place: Place, users: tuple[User, User, str]
) -> None:
    """Each client connection is a file descriptor of the master, held for as long as the
    client's job runs; one user holding all of them (300 idle connections here, or 300
    long jobs) left the master unable to accept anybody else's. Now one user (root apart)
    may hold at most a sixteenth of the master's descriptors, and is told so beyond."""
    a, b, _ = users
    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), nodes=4, allow="all", launcher=FewFds)
    hog = None
    try:
        os.chmod(t.root, 0o755)
        hog = subprocess.Popen(
            [place.python, "-c", HOLD, t.uds],
            user=b.uid,
            group=b.gid,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert hog.stdout.readline().startswith("holding"), "b's connections are made"
        master = Path(f"/proc/{t.pid('master')}/fd")
        ask = as_user(a, place, *t.switches(), "i", popen=True)
        most = 0
        while ask.poll() is None:  # the master's descriptors while a asks, b flooding
            most = max(most, len(os.listdir(master)))
        out, err = ask.communicate(timeout=60)
        assert ask.returncode == 0, err
        assert "4 nodes below master: 4 up" in out, out
        # a backlog of 100 let the refused connections fill all 256 (then a's name lookup
        # failed); the backlog is now the per-user share
        assert most < MASTER_FDS // 2, f"the master held {most} of its {MASTER_FDS} descriptors"
        more = as_user(b, place, *t.switches(), "i")
        assert more.returncode == 1, more.stdout
        assert f"uid {b.uid} ({b.name}) already has" in more.stderr, more.stderr
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        t.launcher.down()
    assert_clean_logs(t)


# ---------------------------------------------------------------- gproc cp's placement


def test_cp_places_files_only_where_its_user_may(
    place: Place, users: tuple[User, User, str], shared_tree: Tree
) -> None:
    """The placement program runs as the job's user on each node, not as the root daemon."""
    a = users[0]
    closed = Path(tempfile.mkdtemp(dir=place.root))  # root's, 0700
    source = Path(a.home) / "mine.txt"
    source.write_text("mine\n")
    os.chown(source, a.uid, a.gid)
    try:
        r = as_user(a, place, *shared_tree.switches(), "cp", "./.", str(source), f"{closed}/")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Permission denied" in r.stderr, r.stderr
        assert list(closed.iterdir()) == [], "nothing placed in root's directory"
    finally:
        source.unlink()
        closed.rmdir()


def test_cp_works_for_users_when_the_daemons_python_is_roots_alone(
    place: Place, users: tuple[User, User, str]
) -> None:
    """The placement execs a Python as the job's user: the daemon's own, here a virtualenv
    whose interpreter sits in /root, failed every user's cp with "cannot start ...: Permission
    denied". Such a node now runs its python3 from the standard PATH instead."""
    path = Path(os.path.realpath(sys.executable))
    if all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
        pytest.skip(f"{sys.executable} is for everyone here: there is nothing to fall back from")
    a = users[0]
    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), nodes=4, allow="all")
    dest = Path(tempfile.mkdtemp(dir=place.root))
    os.chown(dest, a.uid, a.gid)
    source = Path(a.home) / "tocopy.txt"
    source.write_text("placed\n")
    os.chown(source, a.uid, a.gid)
    try:
        os.chmod(t.root, 0o755)
        r = as_user(a, place, *t.switches(), "cp", "./.", str(source), f"{dest}/")
        assert r.returncode == 0, r.stdout + r.stderr
        assert (dest / "tocopy.txt").read_text() == "placed\n"
        assert (dest / "tocopy.txt").stat().st_uid == a.uid, "placed as a"
    finally:
        t.launcher.down()
        source.unlink()
        shutil.rmtree(dest, ignore_errors=True)
    assert_clean_logs(t)


PLANT = """
import os, sys
shared, victim, first, top = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for pid in range(first, first + 4000):  # the names the placement's next processes would use
    os.symlink(victim, os.path.join(shared, f".dest.gproc-{pid % top}"))
print("planted", flush=True)
"""


def test_cp_never_writes_through_a_name_planted_in_the_destination(
    place: Place, users: tuple[User, User, str], shared_tree: Tree
) -> None:
    """In a directory others may write (a project's, without the sticky bit), the placement
    wrote each file to ``.NAME.gproc-PID`` first, following whatever was there: another user
    who planted symlinks at the coming pids had a's copy overwrite any file of a's (her
    ~/.bashrc here) and left the symlink as the destination. Temporary names are now random
    and created new (O_EXCL, O_NOFOLLOW)."""
    a, b, _ = users
    shared = Path(tempfile.mkdtemp(dir=place.root))
    shared.chmod(0o777)
    victim = Path(a.home) / ".bashrc-precious"
    victim.write_text("precious\n")
    os.chown(victim, a.uid, a.gid)
    source = Path(a.home) / "copied.txt"
    source.write_text("copied\n")
    os.chown(source, a.uid, a.gid)
    try:
        first = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
        top = int(Path("/proc/sys/kernel/pid_max").read_text())
        plant = subprocess.run(
            [place.python, "-c", PLANT, str(shared), str(victim), str(first), str(top)],
            user=b.uid,
            group=b.gid,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plant.stdout.strip() == "planted", plant.stderr
        r = as_user(a, place, *shared_tree.switches(), "cp", "1", str(source), f"{shared}/dest")
        assert r.returncode == 0, r.stdout + r.stderr
        assert victim.read_text() == "precious\n", "a's own file is untouched"
        assert not (shared / "dest").is_symlink(), "the destination is the copy, not b's link"
        assert (shared / "dest").read_text() == "copied\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        victim.unlink()
        source.unlink()


class EveryonesPython(LocalTree):
    """Daemons run by a Python every user may run, as on a node whose gproc uses the system's:
    gproc cp's placement runs the daemon's Python as the job's user."""

    python = ""
    site = ""

    def _gproc(self, *mode: str) -> list[str]:
        argv = super()._gproc(*mode)
        return ["env", f"PYTHONPATH={self.site}", self.python, "-s", *argv[1:]]


@pytest.fixture(scope="module")
def shared_tree(place: Place, users: tuple[User, User, str]) -> Iterator[Tree]:
    """An 8-node tree run by root that every local user may use (-allow all)."""

    class Launcher(EveryonesPython):
        python, site = place.python, str(place.site)

    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), allow="all", launcher=Launcher)
    os.chmod(t.root, 0o755)
    yield t
    t.launcher.down()
    assert_clean_logs(t)


# ---------------------------------------------------------------- what others see of a job


def test_a_program_name_cannot_forge_rows_in_the_jobs_list(
    place: Place, users: tuple[User, User, str], shared_tree: Tree
) -> None:
    """'gproc i -jobs' shows every user the running jobs' program names, which are the
    names their users gave: b's program, named with a newline and a made-up row, printed a
    job of a's that did not exist (and escape sequences went to a's terminal as they were).
    Control characters are now shown escaped, so each job is one line."""
    a, b, _ = users
    forged = f"sleep\n0123456789ab  {a.name}  rm  .  1\x1b]0;owned\x07"
    link = Path(b.home) / forged
    link.symlink_to("/bin/sleep")
    os.lchown(link, b.uid, b.gid)
    job = as_user(b, place, *shared_tree.switches(), "e", "1", str(link), "60", popen=True)
    try:

        def listed() -> str | None:
            r = as_user(a, place, *shared_tree.switches(), "i", "-jobs")
            return r.stdout if b.name in r.stdout else None

        table = wait_until(listed, 30, "b's job in the list")
        rows = table.splitlines()
        assert len(rows) == 2, table
        assert rows[1].split()[1] == b.name, "one row, b's; none of a's"
        assert "\x1b" not in table and "\x07" not in table, "no escape reaches a's terminal"
        assert "sleep\\n0123456789ab" in rows[1], rows[1]
    finally:
        job.kill()
        job.communicate()
        link.unlink()


# ---------------------------------------------------------------- root's cleanup


def test_root_removes_a_staging_tree_its_user_booby_trapped_and_nothing_else(
    place: Place, users: tuple[User, User, str], shared_tree: Tree
) -> None:
    """A job's staging tree is its user's while the job runs, and root removes it after: the
    links b's job leaves there (to root's directory, and to a's) are removed, not followed."""
    a, b, _ = users
    roots = Path(tempfile.mkdtemp(dir=place.root))  # root's, 0755, a file inside
    (roots / "keep").write_text("root's\n")
    theirs = Path(a.home) / "keep-a"
    theirs.write_text("a's\n")
    os.chown(theirs, a.uid, a.gid)
    trap = (
        f"ln -s {roots} up && ln -s {theirs} a && mkdir -p d/e && ln -s {roots} d/e/up "
        f"&& ln -s / d/root && chmod 0 d && echo trapped"
    )
    try:
        r = as_user(b, place, *shared_tree.switches(), "e", "./.", "/bin/sh", "-c", trap)
        assert r.returncode == 0, r.stderr
        assert set(lines_of(r.stdout).values()) == {"trapped"}, r.stdout
        stages = [shared_tree.bin_root / f"n{i}.stage" for i in range(1, 9)]
        wait_until(lambda: not any(any(s.iterdir()) for s in stages), 30, "staging removed")
        assert (roots / "keep").read_text() == "root's\n"
        assert theirs.read_text() == "a's\n"
    finally:
        shutil.rmtree(roots, ignore_errors=True)
        theirs.unlink()


# ---------------------------------------------------------------- extreme timeouts


@pytest.mark.parametrize("value", ["nan", "inf", "1e30"])
def test_a_timeout_out_of_range_is_a_usage_error(value: str) -> None:
    """-t and -u NaN or infinite ended the client in a traceback, and 1e30 reached the
    master as a header it refuses: now all are usage errors naming the range."""
    for switch in ("-t", "-u"):
        r = subprocess.run(
            [sys.executable, "-m", "gproc", "-defaultMasterUDS", "/nonexistent"]
            + ["e", switch, value, "./.", "/bin/true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2, r.stderr
        assert f"{switch} takes seconds (0 to 1099511627)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
