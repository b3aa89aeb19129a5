"""The cluster key: a shared secret every daemon of one cluster holds, mode 0600.

Whoever can replace or read the key can run programs on every node, as the daemons' user
(often root). So a daemon reads it only from a regular file that is no symbolic link, that
belongs to the user the daemon runs as (root reads only a key root owns) and that no group
or other user may read, write or run. The checks are made on the open file (``O_NOFOLLOW``,
then ``fstat`` of that descriptor), not on the path before reading it, so nobody can swap
the file between the check and the read.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
from pathlib import Path

from gproc.errors import GprocError

# A key is 64 hex digits; anything much longer is the wrong file, and not worth reading.
MAX_KEY_BYTES = 4096


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gproc" / "cluster.key"


class ClusterKeyError(GprocError):
    """The cluster key is missing or unfit; the message names the path and how to fix it."""


def _user(uid: int) -> str:
    """A user's name for messages (its number when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def load_key(path: str | os.PathLike[str] | None) -> bytes:
    """Read the cluster key; refuse a symlink, another user's file, or one others can read."""
    p = Path(path) if path else default_key_path()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise ClusterKeyError(
            f"no cluster key at {p}: create one with 'gproc k' (or -key PATH) and copy it, "
            "mode 0600, to every node"
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP and p.is_symlink():
            raise ClusterKeyError(
                f"cluster key {p} is a symbolic link{_target(p)}; gproc reads a key only from "
                "the file itself: give -key the real file, or replace the link with a copy "
                "(mode 0600)"
            ) from None
        raise ClusterKeyError(f"cannot read the cluster key {p}: {e.strerror}") from None
    try:
        _check(p, os.fstat(fd))
        data = _read(fd, MAX_KEY_BYTES + 1)
    except OSError as e:
        raise ClusterKeyError(f"cannot read the cluster key {p}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise ClusterKeyError(
            f"cluster key {p} is larger than {MAX_KEY_BYTES} bytes, so it is not a key: "
            f"make one with 'gproc k -key PATH'"
        )
    data = data.strip()
    if len(data) < 16:
        raise ClusterKeyError(
            f"cluster key {p} is too short: make a new one with 'gproc k -key {p}'"
        )
    return data


def _target(link: Path) -> str:
    try:
        return f" (to {os.readlink(link)})"
    except OSError:
        return ""


def _read(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``, as many reads as that takes."""
    parts: list[bytes] = []
    size = 0
    while size < limit and (part := os.read(fd, limit - size)):
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _check(p: Path, st: os.stat_result) -> None:
    """Refuse a key file that is not a regular file of ours, private to us."""
    if not stat.S_ISREG(st.st_mode):
        raise ClusterKeyError(f"cluster key {p} is not a regular file: give -key the key file")
    me = os.geteuid()
    if st.st_uid != me:
        owner, user = _user(st.st_uid), _user(me)
        raise ClusterKeyError(
            f"cluster key {p} belongs to {owner}, not to {user} who runs gproc: "
            f"chown {user} {p} && chmod 600 {p} (as root), or use a key {user} owns"
        )
    if st.st_mode & 0o077:
        raise ClusterKeyError(f"cluster key {p} is readable by others: chmod 600 {p}")


def create_key(path: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Create a fresh random key with mode 0600 unless one exists; returns (path, created).

    Anything already at the path, even a dangling symbolic link, counts as existing (and
    :func:`load_key` then says what is wrong with it); the new file is never made through a
    link.
    """
    p = Path(path) if path else default_key_path()
    if os.path.lexists(p):
        return p, False
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return p, False  # made meanwhile by someone else
    except OSError as e:
        raise ClusterKeyError(f"cannot create the cluster key {p}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p, True
