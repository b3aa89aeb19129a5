"""Many users, one tree run by root: every job runs as the user who asked for it, on every node.

These tests create two users (and a group) for the test and remove them afterwards, run a
local tree as root, and run ``gproc e`` as those users: from a copy of gproc's code in a
directory every user can read, with the system's Python, so the client really is their
process (the kernel's credentials are what the master goes by). They need root and the
shadow tools (useradd); they skip, saying so, where either is missing.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Tree, assert_clean_logs, free_port_block, start_tree, wait_until

from gproc.deploy.local import LocalTree

# Modules that add and remove users run in one pytest-xdist worker, one after another (tox
# passes --dist loadgroup): a useradd or userdel in another worker, while a test here looks a
# user up or has a node bind-mount its own /etc/group, made tests fail now and then (a uid
# briefly without a name; a mount detached when the host's file was renamed over).
USERS_GROUP = pytest.mark.xdist_group("serial")

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("unshare"),
        reason="needs root, useradd and unshare: the test creates users and runs a tree as root",
    ),
    USERS_GROUP,
]


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> User:
        pw = pwd.getpwnam(name)
        return cls(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@dataclass(frozen=True)
class Place:
    """A directory every user can enter: the trees' sockets and binRoots, the client's code,
    and a Python of this version that every user may run."""

    root: Path
    site: Path
    python: str


def python_for_everyone() -> str | None:
    """This Python, or the system's of the same version (this one may sit in root's home)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/python{version}"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"],
                user=65534,
                group=65534,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                text=True,
            )
        except OSError:  # not there, or not for nobody to run
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    return None


@pytest.fixture(scope="module")
def place() -> Iterator[Place]:
    python = python_for_everyone()
    if python is None:
        pytest.skip(
            f"no Python {sys.version_info.major}.{sys.version_info.minor} that other users "
            "may run (this one sits where only root can reach it): install python3"
        )
    root = Path(tempfile.mkdtemp(prefix="gproc-users-"))
    root.chmod(0o755)
    site = root / "site"
    import elftools
    import msgpack

    import gproc
    import gproc.deploy
    import gproc.locales

    for module, where in (
        (gproc, "gproc"),
        (gproc.locales, "gproc/locales"),
        (gproc.deploy, "gproc/deploy"),
        (msgpack, "msgpack"),
        (elftools, "elftools"),
    ):
        source = Path(module.__file__).parent
        shutil.copytree(  # installed, locales and deploy are inside gproc already
            source, site / where, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )
    for top, dirs, files in os.walk(site):
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o755)
        for name in files:
            os.chmod(os.path.join(top, name), 0o644)
    yield Place(root, site, python)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[User, User, str]]:
    """Two users made for this module, and a group only the first belongs to."""
    tag = os.urandom(3).hex()
    group = f"gpg{tag}"
    made: list[str] = []
    try:
        subprocess.run(["groupadd", group], check=True, capture_output=True)
        for letter in "ab":
            name = f"gp{letter}{tag}"
            subprocess.run(
                ["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True
            )
            made.append(name)
        subprocess.run(["usermod", "-aG", group, made[0]], check=True, capture_output=True)
        yield User.named(made[0]), User.named(made[1]), group
    finally:
        for name in made:
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def as_user(
    user: User, place: Place, *argv: str, env: dict[str, str] | None = None, popen: bool = False
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``gproc ARGV`` run by ``user`` (uid, gid and groups as a login would give them)."""
    main = "from gproc.cli import main; sys.exit(main())"
    return python_as(user, place, main, *argv, env=env, popen=popen)


def python_as(
    user: User,
    place: Place,
    code: str,
    *argv: str,
    env: dict[str, str] | None = None,
    popen: bool = False,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Python ``code`` (with ``sys`` imported and the copied site first on the path) run by
    ``user`` with ``argv``, as :func:`as_user` runs gproc."""
    code = f"import sys; sys.path.insert(0, {str(place.site)!r})\n{code}"
    kw = dict(
        user=user.uid,
        group=user.gid,
        extra_groups=os.getgrouplist(user.name, user.gid),
        cwd=user.home,
        env={"PATH": "/usr/bin:/bin", "HOME": user.home, "USER": user.name, **(env or {})},
        text=True,
    )
    command = [place.python, "-s", "-c", code, *argv]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    return subprocess.run(command, capture_output=True, timeout=60, **kw)


def lines_of(stdout: str) -> dict[str, str]:
    """``{node: text}`` from labelled one-line-per-node output."""
    out = {}
    for line in stdout.splitlines():
        node, _, text = line.partition(": ")
        out[node] = text
    return out


NODES = {f"n{i}" for i in range(1, 9)}


@pytest.fixture(scope="module")
def shared(place: Place, users: tuple[User, User, str]) -> Iterator[Tree]:
    """An 8-node tree run by root that every local user may use (-allow all)."""
    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), allow="all")
    os.chmod(t.root, 0o755)
    yield t
    t.launcher.down()
    assert_clean_logs(t)


def test_each_user_runs_as_themselves_on_every_node(
    shared: Tree, place: Place, users: tuple[User, User, str]
) -> None:
    for user in users[:2]:
        r = as_user(user, place, *shared.switches(), "e", "./.", "/usr/bin/id", "-u")
        assert r.returncode == 0, r.stderr
        assert lines_of(r.stdout) == {n: str(user.uid) for n in NODES}, r.stdout
    r = shared.gproc("e", "./.", "/usr/bin/id", "-u")
    assert r.returncode == 0, r.stderr
    assert lines_of(r.stdout) == {n: "0" for n in NODES}, "root's jobs stay root's"


def test_groups_are_the_users_own(
    shared: Tree, place: Place, users: tuple[User, User, str]
) -> None:
    a, _, group = users
    r = as_user(a, place, *shared.switches(), "e", "./.", "/usr/bin/id", "-Gn")
    assert r.returncode == 0, r.stderr
    for node, text in lines_of(r.stdout).items():
        assert set(text.split()) == {a.name, group}, f"{node}: {text}"


def test_a_client_that_claims_to_be_root_still_runs_as_itself(
    shared: Tree, place: Place, users: tuple[User, User, str]
) -> None:
    """The header's user fields are the master's to fill: a lie in them is overwritten."""
    a = users[0]
    code = (
        "import gproc.client as c\n"
        "real = c.build_job\n"
        "def lying(opts):\n"
        "    header, manifest = real(opts)\n"
        "    header.user, header.uid, header.gid = 'root', 0, 0\n"
        "    return header, manifest\n"
        "c.build_job = lying\n"
        "from gproc.cli import main; sys.exit(main())"
    )
    r = python_as(a, place, code, *shared.switches(), "e", "./.", "/usr/bin/id", "-u")
    assert r.returncode == 0, r.stderr
    assert lines_of(r.stdout) == {n: str(a.uid) for n in NODES}, r.stdout


def test_a_user_cannot_read_or_kill_another_users_job(
    shared: Tree, place: Place, users: tuple[User, User, str]
) -> None:
    a, b, _ = users
    go = place.root / f"go-{os.urandom(4).hex()}"
    script = f"echo $$; while [ ! -e {go} ]; do sleep 0.05; done; echo finished"
    job = as_user(b, place, *shared.switches(), "e", "1", "/bin/sh", "-c", script, popen=True)
    try:
        first = job.stdout.readline()  # "n4: PID" once b's program runs
        node, _, pid = first.strip().partition(": ")
        assert pid.isdigit(), f"b's job did not start: {first!r} {job.stderr.read()}"
        stage = shared.bin_root / f"{node}.stage"
        mine = [d for d in stage.iterdir() if d.stat().st_uid == b.uid]
        assert len(mine) == 1, f"b's staging directory: {list(stage.iterdir())}"
        assert mine[0].stat().st_mode & 0o777 == 0o700

        jobs = as_user(a, place, *shared.switches(), "i", "-jobs")
        assert jobs.returncode == 0, jobs.stderr
        rows = [line.split() for line in jobs.stdout.splitlines()]
        assert rows[0] == ["JOB", "USER", "PROGRAM", "NODES", "SECONDS"]
        assert [r[1:4] for r in rows[1:]] == [[b.name, "sh", "1"]], "who runs what, where"
        look = as_user(a, place, *shared.switches(), "e", "1", "/bin/ls", str(mine[0]))
        assert look.returncode != 0
        assert "Permission denied" in look.stdout + look.stderr
        kill = as_user(a, place, *shared.switches(), "e", "1", "/bin/kill", "-9", pid)
        assert kill.returncode != 0
        assert "Operation not permitted" in kill.stdout + kill.stderr
    finally:
        go.touch()
        out, err = job.communicate(timeout=60)
        go.unlink()
    assert job.returncode == 0, err
    assert out.strip() == f"{node}: finished", "b's job ran on, untouched"
    wait_until(lambda: not any(stage.iterdir()), 10, "b's staging directory to be removed")


def test_exported_environment(shared: Tree) -> None:
    env = dict(os.environ, FOO_SECRET="hunter2", KEEP_ME="yes")
    every = shared.gproc("e", "1", "/usr/bin/env", env=env)
    assert "FOO_SECRET=hunter2" in every.stdout, "ALL (the default) ships everything"
    some = shared.gproc("e", "-export", "KEEP_ME", "1", "/usr/bin/env", env=env)
    assert some.returncode == 0, some.stderr
    assert "KEEP_ME=yes" in some.stdout and "FOO_SECRET" not in some.stdout
    none = shared.gproc("e", "-export", "NONE", "1", "/usr/bin/env", env=env)
    assert none.returncode == 0, none.stderr
    got = dict(line.split(": ", 1)[1].split("=", 1) for line in none.stdout.splitlines())
    assert "FOO_SECRET" not in got and "KEEP_ME" not in got
    assert got["USER"] == "root" and got["HOME"] == pwd.getpwuid(0).pw_dir and got["PATH"]
    bad = shared.gproc("e", "-export", "A=1", "1", "/usr/bin/env")
    assert bad.returncode == 1 and "-export" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- per-node user databases


class WithOwnPasswd(LocalTree):
    """Starts chosen nodes in their own mount namespace, seeing their own /etc.

    The whole of /etc is a copy with that node's passwd: a mount on /etc/passwd itself would
    be dropped (Linux detaches mounts on a file renamed over in another namespace) the
    moment another test's useradd replaced the host's /etc/passwd.
    """

    passwd: dict[str, Path] = {}

    def _gproc(self, *mode: str) -> list[str]:
        argv = super()._gproc(*mode)
        node = f"n{mode[1]}" if mode[:1] == ("-myId",) else None
        if node not in self.passwd:
            return argv
        etc = self.passwd[node].with_suffix(".etc")
        shutil.copytree("/etc", etc, symlinks=True, dirs_exist_ok=True)
        shutil.copyfile(self.passwd[node], etc / "passwd")
        mount = 'mount --bind "$0" /etc && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", mount, str(etc), *argv]


def test_a_user_unknown_on_one_node_fails_there_only(
    place: Place, users: tuple[User, User, str]
) -> None:
    a = users[0]
    lines = Path("/etc/passwd").read_text().splitlines(keepends=True)
    mine = next(line for line in lines if line.startswith(f"{a.name}:"))
    unknown = place.root / "passwd-unknown"
    unknown.write_text("".join(line for line in lines if line is not mine))
    other_uid = place.root / "passwd-other-uid"
    fields = mine.split(":")
    fields[2] = str(a.uid + 4242)
    other_uid.write_text("".join(":".join(fields) if line is mine else line for line in lines))

    class Launcher(WithOwnPasswd):
        passwd = {"n8": unknown, "n3": other_uid}  # n8 is a rack master, n3 a leaf

    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), allow="all", launcher=Launcher)
    try:
        os.chmod(t.root, 0o755)
        r = as_user(a, place, *t.switches(), "e", "./.", "/usr/bin/id", "-u")
        assert r.returncode == 126, r.stdout + r.stderr
        good = NODES - {"n3", "n8"}
        assert lines_of(r.stdout) == {n: str(a.uid) for n in good}, r.stdout
        errors = lines_of(r.stderr)
        assert f"user {a.name} (uid {a.uid}) is unknown on n8" in errors["n8"], r.stderr
        assert f"user {a.name} is uid {a.uid + 4242} on n3, not uid {a.uid}" in errors["n3"]
        ok = t.gproc("e", "./.", "/usr/bin/id", "-u")
        assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 8, "root runs everywhere"
    finally:
        t.launcher.down()
    assert_clean_logs(t)


# ---------------------------------------------------------------- who may use a tree


def test_allow_group_lets_members_in_and_keeps_others_out(
    place: Place, users: tuple[User, User, str]
) -> None:
    a, b, group = users
    t = start_tree(Path(tempfile.mkdtemp(dir=place.root)), nodes=4, allow=f"group:{group}")
    try:
        os.chmod(t.root, 0o755)
        st = os.stat(t.uds)
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
        member = as_user(a, place, *t.switches(), "e", "./.", "/usr/bin/id", "-u")
        assert member.returncode == 0, member.stderr
        assert set(lines_of(member.stdout).values()) == {str(a.uid)}
        other = as_user(b, place, *t.switches(), "e", "./.", "/usr/bin/id", "-u")
        assert other.returncode == 1 and other.stdout == ""
        assert "a master you may not use" in other.stderr, other.stderr
    finally:
        t.launcher.down()


def test_a_bad_allow_is_refused_before_the_master_starts(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gproc", "-allow", "group:no-such-group-x", "m"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "no group 'no-such-group-x'" in r.stderr, r.stderr


# ---------------------------------------------------------------- a squatted socket


@pytest.fixture
def squatter(place: Place, users: tuple[User, User, str]) -> Iterator[tuple[Path, Path]]:
    """User a listens on a socket in a directory everybody can write, as a trap would."""
    a = users[0]
    where = Path(tempfile.mkdtemp(dir=place.root))
    where.chmod(0o1777)
    path, heard = where / "g", where / "heard"
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n"
        "os.chmod(sys.argv[1], 0o777)  # open to every victim\n"
        "print('ready', flush=True)\n"
        "with open(sys.argv[2], 'ab', buffering=0) as f:\n"
        "    while True:\n"
        "        c, _ = s.accept()\n"
        "        while data := c.recv(65536):\n"
        "            f.write(data)\n"
        "        c.close()\n"
    )
    trap = subprocess.Popen(
        [place.python, "-c", code, str(path), str(heard)],
        user=a.uid,
        group=a.gid,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert trap.stdout.readline().strip() == "ready"
        yield path, heard
    finally:
        trap.kill()
        trap.wait()
        shutil.rmtree(where, ignore_errors=True)


def heard_only_the_probe(path: Path, heard: Path) -> bytes:
    """What the trap received, once a last probe's bytes are in (it serves one at a time)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"<probe>")
    wait_until(lambda: heard.exists() and heard.read_bytes().endswith(b"<probe>"), 10, "probe")
    return heard.read_bytes()


def test_the_client_refuses_a_socket_another_user_serves(
    squatter: tuple[Path, Path], place: Place, users: tuple[User, User, str]
) -> None:
    path, heard = squatter
    a, b, _ = users
    env = dict(os.environ, FOO_SECRET="hunter2")
    r = subprocess.run(
        [sys.executable, "-m", "gproc", "-defaultMasterUDS", str(path), "e", "./.", "/bin/true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 1
    assert f"{path} is served by uid {a.uid} ({a.name}), not root or you" in r.stderr, r.stderr
    other = as_user(b, place, "-defaultMasterUDS", str(path), "e", "./.", "/bin/true")
    assert other.returncode == 1 and f"served by uid {a.uid}" in other.stderr, other.stderr
    assert heard_only_the_probe(path, heard) == b"<probe>", "nothing of the job reached it"


def test_the_master_will_not_take_over_another_users_socket(
    squatter: tuple[Path, Path], tmp_path: Path, users: tuple[User, User, str]
) -> None:
    path, _ = squatter
    a = users[0]
    key = tmp_path / "key"
    subprocess.run([sys.executable, "-m", "gproc", "-key", str(key), "k"], check=True)
    port = free_port_block(1)
    r = subprocess.run(
        [sys.executable, "-m", "gproc", "-key", str(key), "-cmdport", str(port)]
        + ["-defaultMasterUDS", str(path), "m"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1, r.stderr
    assert f"{path} already exists and belongs to uid {a.uid} ({a.name})" in r.stderr
    assert path.is_socket(), "the other user's socket is left alone"


def test_a_user_may_not_write_into_the_shared_bin_root(
    shared: Tree, place: Place, users: tuple[User, User, str]
) -> None:
    """-p=false leaves files in binRoot, which every user's jobs see: root's alone."""
    a = users[0]
    r = as_user(a, place, *shared.switches(), "e", "-p=false", "./.", "/bin/true")
    assert r.returncode == 126, r.stderr
    errors = lines_of(r.stderr)
    assert set(errors) >= NODES and all("drop -p=false" in errors[n] for n in NODES), r.stderr
    caches = list(shared.bin_root.glob("*.cache"))
    assert caches and all(c.stat().st_mode & 0o777 == 0o700 for c in caches), "root's only"


def test_only_root_or_the_masters_user_may_drain_nodes(
    shared: Tree, place: Place, users: tuple[User, User, str]
) -> None:
    """A user may run jobs on a shared tree, not take its nodes out of service."""
    a = users[0]
    code = (
        "from gproc import client\n"
        "try:\n"
        f"    client.drain({shared.uds!r}, ['n1', 'n2'], True)\n"
        "except client.ClientError as e:\n"
        "    sys.exit(str(e))\n"
    )
    r = python_as(a, place, code)
    assert r.returncode == 1
    assert "only root or the master's own user may drain nodes" in r.stderr, r.stderr
    ran = shared.gproc("e", "./.", "/bin/true")
    assert ran.returncode == 0 and "draining" not in ran.stderr, "nothing was drained"
