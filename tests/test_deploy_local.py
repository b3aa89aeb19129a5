"""gproc-deploy on the local locale: up, status, down, twice, leaving no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port_block


def deploy(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gproc.deploy.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def daemons(port: int) -> list[str]:
    r = subprocess.run(["pgrep", "-af", "--", f"-cmdport {port} "], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if "gproc" in line]


def test_up_status_down_twice(tmp_path: Path) -> None:
    port = free_port_block(8)
    env = dict(
        os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config")
    )
    common = ["--locale", "local", "--cmdport", str(port)]
    up = [
        "up",
        "1",
        "8",
        *common,
        "--uds",
        str(tmp_path / "g"),
        "--bin-root",
        str(tmp_path / "xproc"),
    ]
    for _ in range(2):
        r = deploy(env, *up)
        assert r.returncode == 0, r.stderr
        assert "8 nodes below master: 8 up, 0 lost" in r.stdout
        again = deploy(env, *up)
        assert "started 0, already running 2" in again.stdout
        assert len(daemons(port)) == 9
        status = deploy(env, "status", *common)
        assert status.returncode == 0 and "n8" in status.stdout
        r = deploy(env, "down", *common)
        assert r.returncode == 0 and "stopped 9 daemons" in r.stdout
        assert daemons(port) == []
        r = deploy(env, "down", *common)
        assert r.returncode == 0 and "none was running" in r.stdout
    assert (tmp_path / "config" / "gproc" / "cluster.key").stat().st_mode & 0o777 == 0o600


def test_status_without_a_tree(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    r = deploy(env, "status", "--cmdport", "1", "--uds", str(tmp_path / "none"))
    assert r.returncode == 1 and "no master answers" in r.stderr


def test_other_locales_are_not_yet_deployable(tmp_path: Path) -> None:
    r = deploy(dict(os.environ), "up", "1", "80", "--locale", "kane")
    assert r.returncode == 2 and "SSH" in r.stderr
