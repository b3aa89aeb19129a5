"""What the harness needs from the host it runs on, and how it says what it is doing.

The harness is meant to pass on a fresh machine with nothing but Docker and the README's
test command: a host tool it lacks (``debootstrap`` to build the base image where no registry
answers) it installs itself when it can, as root with ``apt-get``, saying so on stderr. Where
it cannot, :class:`ToolMissing` names the tool, why it is needed and what to install, and the
harness tests skip with that message, as they do without a Docker engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

# One apt at a time on this host: xdist workers, a second test run, `python -m harness up`.
APT_LOCK = Path(tempfile.gettempdir()) / "gproc-harness-apt.lock"
APT_TIMEOUT = 900  # seconds: apt-get update and a few packages, over a slow mirror
APT_ATTEMPTS = 6  # a mirror or its name server failing for a moment is tried again
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # where admin tools land, not always on PATH


class ToolError(RuntimeError):
    """A host tool could not be installed although this host can install packages."""


class ToolMissing(ToolError):
    """A host tool is absent and cannot be installed here (not root, no apt-get)."""


def say(message: str) -> None:
    """Progress on stderr: the long steps (apt, debootstrap, the image build) take minutes."""
    print(f"harness: {message}", file=sys.stderr, flush=True)


def ensure_tool(command: str, package: str, why: str) -> str:
    """The path of ``command`` (on PATH or in the sbin directories), after installing the
    Debian ``package`` if it is missing.

    ``why`` completes "needed ..." in what is said (``"to build the base image"``). Installs
    with ``apt-get update`` and ``apt-get install -y PACKAGE`` when running as root where
    apt-get exists; raises :class:`ToolMissing` when it cannot, :class:`ToolError` when apt
    fails. Concurrent callers take turns on a host-wide lock, and whoever waited finds the
    command already there.
    """
    found = _which(command)
    if found:
        return found
    cannot = []
    if os.geteuid() != 0:
        cannot.append("not root")
    if shutil.which("apt-get") is None:
        cannot.append("no apt-get")
    if cannot:
        raise ToolMissing(
            f"{command} is missing, needed {why}, and cannot be installed here "
            f"({', '.join(cannot)}): install the package {package} as root"
        )
    with FileLock(str(APT_LOCK), timeout=APT_TIMEOUT):
        found = _which(command)
        if found:
            return found
        say(f"{command} is missing, needed {why}: installing the package {package} (apt-get)")
        _apt(["update", "--error-on=any"])
        _apt(["install", "-y", package])
    found = _which(command)
    if not found:
        raise ToolError(f"apt-get installed {package}, yet there is no {command}")
    say(f"installed {package}: {found}")
    return found


def _which(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path=SBIN)


def _apt(args: list[str], attempts: int = APT_ATTEMPTS) -> None:
    """``apt-get ARGS``, waiting for a dpkg lock another apt holds, tried again with a growing
    pause when it fails (a mirror or name server failing for a moment); its tail on failure."""
    cmd = ["apt-get", "-q", "-o", f"DPkg::Lock::Timeout={APT_TIMEOUT}", *args]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(1, attempts + 1):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{' '.join(cmd)} took over {APT_TIMEOUT}s") from None
        if proc.returncode == 0:
            return
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        if attempt < attempts:
            say(f"{' '.join(cmd)} failed (attempt {attempt} of {attempts}); trying again")
            time.sleep(5 * attempt)
    raise ToolError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
