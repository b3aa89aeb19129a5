"""gproc cp and rcp on a real local tree (its 8 nodes share this machine's disk, so every
node places the same files: each one's report says it did)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Tree

NODES = {f"n{i}" for i in range(1, 9)}


def reports(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines())


def sources(where: Path) -> tuple[Path, Path]:
    where.mkdir()
    single = where / "a.txt"
    single.write_text("hello\n")
    single.chmod(0o640)
    tree = where / "d"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "y").write_text("why\n")
    (tree / "link").symlink_to("sub/y")
    return single, tree


def test_cp_puts_files_into_a_directory_on_every_node(tree: Tree, tmp_path: Path) -> None:
    single, directory = sources(tmp_path / "src")
    dest = tmp_path / "dest"
    dest.mkdir()
    r = tree.gproc("cp", "./.", str(single), str(directory), str(dest))
    assert r.returncode == 0, r.stderr
    assert reports(r.stdout) == {n: f"copied 2 files, 10 bytes to {dest}" for n in NODES}
    assert (dest / "a.txt").read_text() == "hello\n"
    assert (dest / "a.txt").stat().st_mode & 0o777 == 0o640, "the mode is kept"
    assert (dest / "d" / "sub" / "y").read_text() == "why\n"
    assert os.readlink(dest / "d" / "link") == "sub/y", "symlinks stay symlinks"
    assert not [p for p in dest.rglob("*") if ".gproc-" in p.name], "no temporary left"


def test_cp_of_one_file_to_a_new_name(tree: Tree, tmp_path: Path) -> None:
    single, _ = sources(tmp_path / "src")
    r = tree.gproc("cp", "1/.", str(single), str(tmp_path / "renamed"))
    assert r.returncode == 0, r.stderr
    assert set(reports(r.stdout)) == {"n1", "n2", "n3", "n4"}
    assert (tmp_path / "renamed").read_text() == "hello\n"


def test_cp_of_several_sources_needs_a_directory(tree: Tree, tmp_path: Path) -> None:
    single, directory = sources(tmp_path / "src")
    r = tree.gproc("cp", "./.", str(single), str(directory), str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert f"{tmp_path / 'nowhere'} is not a directory" in r.stderr
    assert "gproc: exit status 1 on n[1-8]" in r.stderr


def test_cp_of_a_missing_source_is_refused_here(tree: Tree, tmp_path: Path) -> None:
    r = tree.gproc("cp", "./.", str(tmp_path / "ghost"), str(tmp_path))
    assert r.returncode == 1 and "ghost: no such file or directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_rcp_gathers_a_file_from_every_node(tree: Tree, tmp_path: Path) -> None:
    single, _ = sources(tmp_path / "src")
    into = tmp_path / "gathered"
    into.mkdir()
    r = tree.gproc("rcp", "./.", str(single), str(into))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in into.iterdir()} == {f"a.txt.{n}" for n in NODES}
    assert all((into / f"a.txt.{n}").read_text() == "hello\n" for n in NODES)


def test_rcp_of_a_directory_and_of_what_is_missing(tree: Tree, tmp_path: Path) -> None:
    _, directory = sources(tmp_path / "src")
    into = tmp_path / "gathered"
    into.mkdir()
    r = tree.gproc("rcp", "-w", "n[2,6]", str(directory), str(into))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in into.iterdir()} == {"d.n2", "d.n6"}
    assert (into / "d.n6" / "sub" / "y").read_text() == "why\n"
    gone = tree.gproc("rcp", "1", str(tmp_path / "ghost"), str(into))
    assert gone.returncode != 0
    assert "n4: tar:" in gone.stderr and "ghost" in gone.stderr
    assert {p.name for p in into.iterdir()} == {"d.n2", "d.n6"}, "nothing half-made"


def test_usage_errors(tree: Tree, tmp_path: Path) -> None:
    r = tree.gproc("cp", "./.", str(tmp_path))
    assert r.returncode == 2 and "copy needs SRC... DEST" in r.stderr
    r = tree.gproc("rcp", "./.", "relative/path", str(tmp_path))
    assert r.returncode == 1 and "absolute path" in r.stderr
    r = tree.gproc("rcp", "./.", "/etc/hostname", str(tmp_path / "absent"))
    assert r.returncode == 1 and "is not a directory here" in r.stderr
