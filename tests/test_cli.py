"""The command line as a user meets it: help, misuse, Go-style switches, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gproc.cli import parse


def gproc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gproc", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
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


@pytest.mark.parametrize("columns", [60, 120])
def test_help_wraps_the_switches_to_the_terminal(columns: int) -> None:
    """The switches' help fits COLUMNS, as argparse's own width would (gproc.cli asks
    the terminal itself); the modes' text above them is laid out by hand."""
    r = gproc("--help", env={**os.environ, "COLUMNS": str(columns)})
    assert r.returncode == 0
    switches = r.stdout[r.stdout.index("\noptions:") :].splitlines()
    assert max(len(line) for line in switches) <= columns
    assert max(len(line) for line in switches) > columns - 20  # the width is used, too


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


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """gproc failed as it should for a user's mistake: status 1 and one line, no traceback."""
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("gproc: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_slave_of_an_unknown_locale(tmp_path) -> None:
    r = gproc("-locale", "mars", "-key", str(tmp_path / "k"), "s")
    message = one_error_line(r)
    assert "unknown locale 'mars'" in message and "local, " in message


@pytest.mark.parametrize("spec", ["1/" * 1200 + ".", "/".join(["."] * 900)])
def test_a_deep_spec_is_a_usage_error_not_a_traceback(tmp_path, spec: str) -> None:
    """It used to be a RecursionError here, or at 900 levels a job the master dropped."""
    r = gproc("-defaultMasterUDS", str(tmp_path / "none"), "e", spec, "/bin/true")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    usage, error = r.stderr.splitlines()
    assert usage.startswith("usage: gproc")
    assert error.startswith("gproc: error: bad node spec '...")
    assert "at position 63: the spec nests deeper than 32 levels" in error
    assert len(error) < 300


def test_a_program_that_is_not_there(tmp_path) -> None:
    r = gproc("-defaultMasterUDS", str(tmp_path / "none"), "e", ".", str(tmp_path / "nothing"))
    assert f"{tmp_path / 'nothing'}: no executable file found" in one_error_line(r)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_a_program_whose_library_is_missing(tmp_path) -> None:
    """The closure fails on the front-end, before any master is asked: one line naming the
    library, its user and the switches that fix it."""
    (tmp_path / "gone.c").write_text("int gone(void) { return 0; }\n")
    (tmp_path / "prog.c").write_text("int gone(void);\nint main(void) { return gone(); }\n")
    lib = tmp_path / "lib"
    lib.mkdir()
    for args in (
        ["-shared", "-fPIC", "-o", lib / "libgone.so", tmp_path / "gone.c"],
        ["-o", tmp_path / "prog", tmp_path / "prog.c", f"-L{lib}", "-lgone"],
    ):
        subprocess.run(["gcc", *map(str, args)], check=True, capture_output=True)
    shutil.rmtree(lib)
    r = gproc("-defaultMasterUDS", str(tmp_path / "none"), "e", ".", str(tmp_path / "prog"))
    message = one_error_line(r)
    assert f"libgone.so (needed by {os.path.realpath(tmp_path / 'prog')}) not found" in message
    assert "-L" in message and "-f" in message


def test_daemon_refuses_a_symlinked_key(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    assert gproc("-key", str(real), "k").returncode == 0
    link = tmp_path / "cluster.key"
    link.symlink_to(real)
    message = one_error_line(gproc("-locale", "kane", "-myId", "3", "-key", str(link), "s"))
    assert f"cluster key {link} is a symbolic link (to {real})" in message


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
    assert "chmod 600" in one_error_line(r)


def test_an_empty_spec_is_a_usage_error_unless_w_names_the_nodes() -> None:
    r = subprocess.run([sys.executable, "-m", "gproc", "e", "", "/bin/true"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "bad node spec ''" in r.stderr
