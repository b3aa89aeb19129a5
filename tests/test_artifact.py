"""The zipapp artifact: reproducible, and enough on its own to run gproc with bare python3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Tree, labelled

from gproc.deploy.artifact import build_zipapp


def test_same_code_same_bytes(tmp_path: Path) -> None:
    _, first = build_zipapp(tmp_path / "a.pyz")
    _, second = build_zipapp(tmp_path / "b.pyz")
    assert first == second
    assert (tmp_path / "a.pyz").read_bytes() == (tmp_path / "b.pyz").read_bytes()


def test_runs_a_job_without_site_packages(tmp_path: Path, tree: Tree) -> None:
    """python3 -S sees no msgpack or pyelftools: the archive's own copies must do."""
    pyz, _ = build_zipapp(tmp_path / "gproc.pyz")
    r = subprocess.run(
        [
            sys.executable,
            "-S",
            str(pyz),
            *tree.switches(),
            "e",
            "1/.",
            "/bin/echo",
            "from the zipapp",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tree.root,
    )
    assert r.returncode == 0, r.stderr
    assert labelled(r.stdout) == {n: ["from the zipapp"] for n in ("n1", "n2", "n3", "n4")}
