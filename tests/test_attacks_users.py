"""Attacks by local users who have no cluster key, on a tree run by root with -allow all.

Like tests/test_users.py, these create users for the test (and remove them afterwards), run
real daemons as root, and act as those users from a copy of gproc's code with the system's
Python. They need root and the shadow tools; they skip, saying so, where either is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port_block, wait_until
from test_users import Place, User, place, users

FIXTURES = (place, users)  # test_users' module fixtures: two users, a site they can run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("unshare"),
    reason="needs root, useradd and unshare: the test creates users and runs a tree as root",
)


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

    os.chmod(sticky / "xproc", 0o755)
    (sticky / "elsewhere").mkdir()
    os.symlink(sticky / "elsewhere", sticky / "xproc" / "n1.cache")
    err = refused(sticky, sticky / "xproc")
    assert "n1.cache is a symlink, not a directory" in err, err


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
