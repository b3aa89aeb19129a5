"""The cluster key file: what a daemon accepts, what it refuses, and what it tells the user."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from gproc.keys import ClusterKeyError, create_key, load_key

is_root = os.geteuid() == 0


def make_key(path: Path, mode: int = 0o600) -> bytes:
    created, made = create_key(path)
    assert (created, made) == (path, True)
    path.chmod(mode)
    return path.read_bytes().strip()


def refusal(path: Path) -> str:
    with pytest.raises(ClusterKeyError) as caught:
        load_key(path)
    return str(caught.value)


def test_a_private_key_of_ours_is_read(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    made = make_key(key)
    assert load_key(key) == made and len(made) == 64


def test_a_symlinked_key_is_refused_and_the_message_names_the_real_file(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    make_key(real)
    link = tmp_path / "cluster.key"
    link.symlink_to(real)
    message = refusal(link)
    assert str(link) in message and "symbolic link" in message and str(real) in message
    assert load_key(real)  # the file itself is fine


def test_a_dangling_link_is_neither_written_through_nor_read(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "planted.key"
    link = tmp_path / "cluster.key"
    link.symlink_to(target)
    assert create_key(link) == (link, False)
    assert not target.exists()
    assert "symbolic link" in refusal(link)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o610, 0o644])
def test_a_key_others_may_use_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "cluster.key"
    make_key(key, mode)
    message = refusal(key)
    assert message == f"cluster key {key} is readable by others: chmod 600 {key}"


@pytest.mark.skipif(not is_root, reason="only root can give a file to another user")
def test_a_key_owned_by_another_user_is_refused_even_for_root(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    make_key(key)
    other = (
        pwd.getpwnam("nobody").pw_uid if "nobody" in {p.pw_name for p in pwd.getpwall()} else 65534
    )
    os.chown(key, other, -1)
    message = refusal(key)
    assert str(key) in message and "not to root who runs gproc" in message
    assert f"chown root {key} && chmod 600 {key}" in message
    os.chown(key, 0, -1)
    assert load_key(key)  # the fix the message gives works


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_key_path_that_is_no_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO would block a reader forever; the daemon must say what is wrong instead."""
    key = tmp_path / "cluster.key"
    if kind == "directory":
        key.mkdir(mode=0o700)
    else:
        os.mkfifo(key, 0o600)
    assert "is not a regular file" in refusal(key)


def test_a_huge_file_is_not_taken_for_a_key(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_bytes(b"0" * (1 << 20))
    key.chmod(0o600)
    assert "is not a key" in refusal(key)


def test_missing_and_short_keys_say_how_to_make_one(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    assert "create one with 'gproc k'" in refusal(key)
    key.write_text("short\n")
    key.chmod(0o600)
    assert f"gproc k -key {key}" in refusal(key)
