"""gproc-deploy on the local locale: up, status, down, twice, leaving no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port_block

# The trees here run on the default binRoot (/tmp/xproc/nN), so two of them at once share
# their nodes' directories: one at a time, in the serial pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("serial")


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
    try:
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
    finally:
        deploy(env, "down", *common)
    assert (tmp_path / "config" / "gproc" / "cluster.key").stat().st_mode & 0o777 == 0o600


def test_status_without_a_tree(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    r = deploy(env, "status", "--cmdport", "1", "--uds", str(tmp_path / "none"))
    assert r.returncode == 1 and "no master answers" in r.stderr


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    r = deploy(env, "up", "1", "80", "--locale", "kane", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "level 1 (4): start, then wait for registration: kn[20,40,60,80]" in r.stdout
    assert "level 2 (76)" in r.stdout
    assert not (tmp_path / "state").exists()


def test_unreachable_hosts_are_reported(tmp_path: Path) -> None:
    """Two nodes whose sshd port refuses: each UNREACHABLE, with the reason, exit 1."""
    port = free_port_block(1)
    topology = tmp_path / "two.json"
    topology.write_text(
        json.dumps(
            {
                "master": {"name": "fe", "address": "127.0.0.1", "port": port},
                "nodes": [
                    {"name": f"t{i}", "number": i, "address": "127.0.0.1", "parent": "fe"}
                    for i in (1, 2)
                ],
            }
        )
    )
    env = dict(
        os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config")
    )
    known = tmp_path / "known_hosts"
    known.write_text("")
    r = deploy(
        env,
        "copy",
        "1",
        "2",
        "--locale",
        str(topology),
        "--port",
        str(port),
        "--connect-timeout",
        "3",
        "--key",
        str(tmp_path / "key"),
        "--known-hosts",
        str(known),
    )
    assert r.returncode == 1
    lines = [line.split(None, 2) for line in r.stdout.splitlines() if line.startswith("t")]
    assert [(name, state) for name, state, _ in lines] == [
        ("t1", "unreachable"),
        ("t2", "unreachable"),
    ]
    assert all("cannot connect" in why for _, _, why in lines)
    assert "recap: 0 ok, 0 changed, 0 failed, 2 unreachable, 0 skipped" in r.stdout


def test_what_every_host_would_fail_on_is_one_error_up_front(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    known = tmp_path / "known_hosts"
    known.write_text("")
    r = deploy(env, "up", "1", "80", "--locale", "kane", "--identity", str(tmp_path / "nokey"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (
        f"gproc-deploy: --identity {tmp_path / 'nokey'} does not exist: give the private key file"
    )
    r = deploy(env, "up", "1", "80", "--locale", "kane", "--known-hosts", str(tmp_path / "no"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "no known_hosts file at" in r.stderr and "--accept-new-host-keys" in r.stderr


def test_a_second_run_waits_for_the_first_then_names_it(tmp_path: Path) -> None:
    """The run lock: a holder is named, and the second run gives up after --lock-wait."""
    from gproc.deploy.lock import Busy, run_lock

    said: list[str] = []
    with run_lock(tmp_path, 1.0, said.append):
        holder = (tmp_path / "deploy.lock").read_text()
        assert holder.startswith(f"pid {os.getpid()}:")
        env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "xdg"))
        state = tmp_path / "xdg" / "gproc" / "kane-6666"
        state.mkdir(parents=True)
        known = tmp_path / "known"
        known.write_text("")
        with run_lock(state, 0, said.append):
            r = deploy(env, "up", "1", "80", "--locale", "kane", "--lock-wait", "0.5",
                       "--known-hosts", str(known))  # fmt: skip
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"another gproc-deploy run holds {state / 'deploy.lock'} (pid {os.getpid()}" in (
            r.stderr
        )
        assert "waiting up to 0s" in r.stdout or "waiting up to 1s" in r.stdout
    with pytest.raises(Busy), run_lock(tmp_path, 0, said.append), run_lock(tmp_path, 0, print):
        pass  # the same process, a second open of the lock file: refused at once


def test_a_socket_taken_by_another_master_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(
        os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config")
    )
    first, second = free_port_block(4), free_port_block(4)
    uds = str(tmp_path / "g")
    try:
        ok = deploy(env, "up", "1", "4", "--cmdport", str(first), "--uds", uds)
        assert ok.returncode == 0, ok.stderr
        r = deploy(env, "up", "1", "4", "--cmdport", str(second), "--uds", uds)
        assert r.returncode == 1
        assert f"another master (children on 127.0.0.1:{first}) answers on {uds}" in r.stderr
    finally:
        deploy(env, "down", "--cmdport", str(first))
        deploy(env, "down", "--cmdport", str(second))
    assert daemons(first) == [] and daemons(second) == []


def test_nodes_without_their_rack_master_are_refused_up_front(tmp_path: Path) -> None:
    env = dict(
        os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config")
    )
    port = free_port_block(8)
    try:
        r = deploy(env, "up", "1", "2", "--cmdport", str(port), "--uds", str(tmp_path / "g"))
        assert r.returncode == 1
        assert "n[1-2] hang below n4, which is neither in 1..2 nor running" in r.stderr
    finally:
        deploy(env, "down", "--cmdport", str(port))
    assert daemons(port) == []


def test_down_and_status_follow_the_locale_of_the_last_up(tmp_path: Path) -> None:
    env = dict(
        os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config")
    )
    port = free_port_block(4)
    try:
        up = deploy(
            env,
            "up",
            "1",
            "4",
            "--locale",
            "local",
            "--cmdport",
            str(port),
            "--uds",
            str(tmp_path / "g"),
        )
        assert up.returncode == 0, up.stderr
        status = deploy(env, "status", "--cmdport", str(port))
        assert status.returncode == 0 and "n4" in status.stdout
    finally:
        r = deploy(env, "down", "--cmdport", str(port))
    assert "stopped 5 daemons" in r.stdout
    assert daemons(port) == []


def test_up_allow_all_opens_the_socket_to_every_user(tmp_path: Path) -> None:
    """gproc-deploy up --allow passes it to the master; a bad value fails before any start."""
    port = free_port_block(4)
    env = dict(
        os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config")
    )
    common = ["--locale", "local", "--cmdport", str(port)]
    where = ["--uds", str(tmp_path / "g"), "--bin-root", str(tmp_path / "xproc")]
    bad = deploy(env, "up", "1", "4", *common, *where, "--allow", "everyone")
    assert bad.returncode == 1 and "use owner, all or group:NAME" in bad.stderr, bad.stderr
    assert daemons(port) == []
    try:
        r = deploy(env, "up", "1", "4", *common, *where, "--allow", "all")
        assert r.returncode == 0, r.stderr
        assert os.stat(tmp_path / "g").st_mode & 0o777 == 0o666
    finally:
        deploy(env, "down", *common)
    assert daemons(port) == []


def test_an_up_with_an_unknown_locale_is_not_remembered(tmp_path: Path) -> None:
    """So the next plain down still acts on the tree the last good up started."""
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    bad = deploy(env, "up", "1", "8", "--locale", "nosuch")
    assert bad.returncode == 1 and "nosuch" in bad.stderr
    assert not (tmp_path / "state" / "gproc" / "last-up.json").exists()
    down = deploy(env, "down", "--cmdport", str(free_port_block(1)))
    assert down.returncode == 0, down.stderr
