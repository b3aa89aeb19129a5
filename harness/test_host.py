"""Host tools: what the harness says when it lacks one it cannot install (no cluster needed).

The install itself (root, apt-get) is exercised for real by a harness run on a machine
without debootstrap, which is how CI starts; it changes the host, so no test forces it here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.host import ToolError, ToolMissing, ensure_tool

CHECKOUT = Path(__file__).resolve().parents[1]
MISSING = "gproc-no-such-tool"


def test_a_present_tool_is_found_and_nothing_installed(capfd) -> None:
    assert ensure_tool("sh", "dash", "for this test") == shutil.which("sh")
    assert capfd.readouterr().err == ""


def test_without_apt_get_the_reason_names_tool_package_and_why(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a host with no apt-get (and no such tool)
    with pytest.raises(ToolMissing) as caught:
        ensure_tool(MISSING, "gproc-no-such-package", "to build the base image")
    message = str(caught.value)
    assert MISSING in message and "gproc-no-such-package" in message
    assert "to build the base image" in message and "no apt-get" in message
    assert isinstance(caught.value, ToolError)


def test_not_root_the_reason_says_so() -> None:
    """In a user namespace of its own, a process is not root (euid 65534) and may not apt."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    code = (
        "import os, sys\n"
        "from harness.host import ToolMissing, ensure_tool\n"
        "print(os.geteuid(), file=sys.stderr)\n"
        f"try: ensure_tool({MISSING!r}, 'pkg', 'for this test')\n"
        "except ToolMissing as e: sys.exit(str(e))\n"
    )
    res = subprocess.run(
        ["unshare", "--user", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
    )
    if res.returncode != 0 and "unshare" in res.stderr and MISSING not in res.stderr:
        pytest.skip(f"no user namespace here: {res.stderr.strip()}")
    assert res.returncode == 1, res.stderr
    assert "not root" in res.stderr and "install the package pkg as root" in res.stderr
