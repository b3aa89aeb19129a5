"""The command line as a user meets it: help, misuse, Go-style switches, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gproc.cli import parse


def gproc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gproc", *args], capture_output=True, text=True, timeout=30
    )


def test_help_explains_modes_and_switches() -> None:
    r = gproc("--help")
    assert r.returncode == 0
    for word in (
        "master",
        "slave",
        "exec",
        "info",
        "-localbin",
        "-binRoot",
        "-defaultMasterUDS",
        "-locale",
        "-cmdport",
        "-parent",
        "-debug",
    ):
        assert word in r.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["x"], "unknown mode"),
        (["e"], "node spec"),
        (["e", "./."], "command"),
        (["e", "5-2", "/bin/true"], "bad node spec '5-2' at position 0"),
        (["e", "1//2", "/bin/true"], "bad node spec '1//2' at position 2"),
        (["-p=maybe", "e", ".", "/bin/true"], "true or false"),
        (["-cmdport", "x", "m"], "invalid int"),
        (["i", "extra"], "takes no arguments"),
    ],
)
def test_misuse_prints_usage_and_exits_2(argv: list[str], message: str) -> None:
    r = gproc(*argv)
    assert r.returncode == 2
    assert "usage: gproc" in r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_go_style_switches() -> None:
    a = parse(["-locale=kane", "-cmdport", "7000", "-p=false", "-f=a,b", "e", "./.", "date"])
    assert (a.locale, a.cmdport, a.p, a.f, a.spec, a.command) == (
        "kane",
        7000,
        False,
        "a,b",
        "./.",
        ["date"],
    )
    b = parse(["-locale", "kf", "-p", "s"])
    assert (b.locale, b.p, b.mode) == ("kf", True, "slave")
    assert parse(["i"]).p is True


def test_switches_may_follow_e_and_command_switches_are_the_commands() -> None:
    a = parse(["e", "-b", "-f", "x", "1-3", "/bin/ls", "-l", "-p"])
    assert (a.b, a.f, a.spec, a.command, a.p) == (True, "x", "1-3", ["/bin/ls", "-l", "-p"], True)


def test_no_master_is_a_clear_error(tmp_path) -> None:
    r = gproc("-defaultMasterUDS", str(tmp_path / "none"), "e", ".", "/bin/true")
    assert r.returncode == 1
    assert "no master answers" in r.stderr
    assert "gproc-deploy up" in r.stderr


def test_slave_of_an_unknown_locale(tmp_path) -> None:
    r = gproc("-locale", "mars", "-key", str(tmp_path / "k"), "s")
    assert r.returncode == 1
    assert "mars" in r.stderr and "Traceback" not in r.stderr


def test_key_mode_creates_a_private_key(tmp_path) -> None:
    key = tmp_path / "sub" / "cluster.key"
    assert gproc("-key", str(key), "k").returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_bytes()
    assert gproc("-key", str(key), "k").returncode == 0
    assert key.read_bytes() == first


def test_daemon_refuses_a_key_others_can_read(tmp_path) -> None:
    key = tmp_path / "k"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    r = gproc("-locale", "kane", "-myId", "3", "-key", str(key), "s")
    assert r.returncode == 1
    assert "chmod 600" in r.stderr
