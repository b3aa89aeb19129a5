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


def test_a_zipapp_builds_the_same_artifact(tmp_path: Path) -> None:
    """gproc-deploy may itself run from the zipapp (the harness front-end does)."""
    pyz, digest = build_zipapp(tmp_path / "gproc.pyz")
    code = (
        "import sys; from pathlib import Path; "
        "from gproc.deploy.artifact import build_zipapp; "
        f"print(build_zipapp(Path({str(tmp_path / 'again.pyz')!r}))[1])"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path[:0] = [{str(pyz)!r}]; "
            f"sys.path.append({str(pyz) + '/_vendor'!r}); {code}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest


def test_the_zipapp_carries_bytecode_this_python_loads(tmp_path: Path) -> None:
    """Python writes no bytecode for modules it imports from a zip, so without compiled
    modules in the archive every gproc start compiled all of gproc again."""
    pyz, _ = build_zipapp(tmp_path / "gproc.pyz")
    code = (
        f"import sys; sys.path[:0] = [{str(pyz)!r}]; sys.path.append({str(pyz) + '/_vendor'!r}); "
        "import gproc.cli; print(gproc.cli.__file__)"
    )
    r = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("gproc/cli.pyc"), r.stdout
