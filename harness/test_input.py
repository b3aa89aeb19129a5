"""Bad input gets a clear message and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .checks import gproc


@pytest.mark.parametrize("spec", ["5-2", "a", "1//2", ""])
def test_malformed_spec(cluster, spec):
    res = gproc(cluster, "e", spec, "/bin/true")
    assert res.status == 2
    assert f"bad node spec {spec!r}" in res.err
    assert "Traceback" not in res.err


@pytest.mark.parametrize(
    "argv",
    [["fault", "explode", "kn1"], ["up", "--nodes", "0"], ["up", "--subnet", "10.1.0.0/24"]],
)
def test_harness_cli_rejects_bad_input(argv):
    cmd = [sys.executable, "-m", "harness", "--name", "gproc-badinput", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "error" in res.stderr and "Traceback" not in res.stderr
