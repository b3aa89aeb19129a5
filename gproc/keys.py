"""The cluster key: a shared secret every daemon of one cluster holds, mode 0600."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from gproc.errors import GprocError


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gproc" / "cluster.key"


class ClusterKeyError(GprocError):
    """The cluster key is missing or unreadable; the message says how to make one."""


def load_key(path: str | os.PathLike[str] | None) -> bytes:
    """Read the cluster key; refuse one that others can read."""
    p = Path(path) if path else default_key_path()
    try:
        st = p.stat()
        data = p.read_bytes().strip()
    except FileNotFoundError:
        raise ClusterKeyError(
            f"no cluster key at {p}: create one with 'gproc k' (or -key PATH) and copy it, "
            "mode 0600, to every node"
        ) from None
    except OSError as e:
        raise ClusterKeyError(f"cannot read the cluster key {p}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise ClusterKeyError(f"cluster key {p} is readable by others: chmod 600 {p}")
    if len(data) < 16:
        raise ClusterKeyError(
            f"cluster key {p} is too short: make a new one with 'gproc k -key {p}'"
        )
    return data


def create_key(path: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Create a fresh random key with mode 0600 unless one exists; returns (path, created)."""
    p = Path(path) if path else default_key_path()
    if p.exists():
        return p, False
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p, True
