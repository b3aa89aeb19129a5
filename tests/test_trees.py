"""Shared trees of cached files (gproc.trees): reused by the jobs of one program and user,
never changed by a job, retired when changed behind the node's back, removed only once no
job mounts them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Tree, is_root, labelled
from test_cache import rewrite_in_place

from gproc.bundle import check_manifest
from gproc.cache import BlobCache
from gproc.digest import digest_bytes
from gproc.trees import TreeStore
from gproc.users import RunAs

FILES = {"lib/libc.so.6": os.urandom(300_000), "bin/prog": os.urandom(20_000)}


@pytest.fixture
def store(tmp_path: Path) -> TreeStore:
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    for data in FILES.values():
        src = tmp_path / "src"
        src.write_bytes(data)
        cache.add(str(src), digest_bytes(data))
    return TreeStore(tmp_path / "cache" / "trees", cache, keep=1)


def entries() -> list:
    raw = [
        {"p": p, "k": "f", "m": 0o755, "s": len(d), "h": digest_bytes(d)} for p, d in FILES.items()
    ]
    return check_manifest(raw, sum(len(d) for d in FILES.values()))


def test_the_same_program_gets_the_same_tree(store: TreeStore) -> None:
    first = store.take(entries(), None)
    second = store.take(entries(), None)
    assert first is not None and second is first and first.users == 2
    for path, data in FILES.items():
        assert Path(first.path, path).read_bytes() == data


def test_a_tree_rewritten_with_its_times_put_back_is_not_handed_out(store: TreeStore) -> None:
    """A root job can reach the cache by its path; the change moves ctime, so it is seen."""
    tree = store.take(entries(), None)
    assert tree is not None
    rewrite_in_place(Path(tree.path, "lib/libc.so.6"))
    again = store.take(entries(), None)
    assert again is not None and again is not tree
    assert Path(again.path, "lib/libc.so.6").read_bytes() == FILES["lib/libc.so.6"]
    assert os.path.isdir(tree.path), "still mounted by its job: kept until given back"
    store.give_back(tree)
    assert not os.path.exists(tree.path)


def test_a_tree_in_use_is_not_evicted(store: TreeStore) -> None:
    tree = store.take(entries(), None)
    assert tree is not None
    other = store.take(entries()[:1], None)  # another program: keep=1 wants one tree only
    assert other is not None and os.path.isdir(tree.path)
    store.give_back(other)
    store.give_back(tree)
    assert os.path.isdir(tree.path) != os.path.isdir(other.path), "one unused tree kept"


@pytest.mark.skipif(not is_root, reason="handing a tree to another user needs root")
def test_a_users_tree_is_theirs_and_not_roots(store: TreeStore) -> None:
    nobody = RunAs("nobody", 65534, 65534, (65534,), "/", "/bin/sh")
    theirs = store.take(entries(), nobody)
    roots = store.take(entries(), None)
    assert theirs is not None and roots is not None and theirs is not roots
    assert Path(theirs.path, "lib/libc.so.6").stat().st_uid == 65534
    assert Path(roots.path, "lib/libc.so.6").stat().st_uid == 0


@pytest.mark.skipif(not is_root, reason="private mounts as tested here need root (CI runs as root)")
def test_a_job_that_rewrites_its_cached_files_does_not_change_the_next_job(tree: Tree) -> None:
    data = tree.root / "tree-data"
    data.mkdir(exist_ok=True)
    (data / "words").write_text("original\n")
    ship = ["-f", str(data), "e", "./."]  # the job starts in the copy of tree.root
    first = tree.gproc(*ship, "/bin/cat", "tree-data/words")  # ships it: now cached everywhere
    assert first.returncode == 0, first.stderr
    change = "echo changed > tree-data/words && cat tree-data/words"
    second = tree.gproc(*ship, "/bin/sh", "-c", change)
    assert second.returncode == 0, second.stderr
    assert set(map(tuple, labelled(second.stdout).values())) == {("changed",)}
    third = tree.gproc(*ship, "/bin/cat", "tree-data/words")
    assert third.returncode == 0, third.stderr
    assert set(map(tuple, labelled(third.stdout).values())) == {("original",)}
    assert (data / "words").read_text() == "original\n", "the front-end's file, untouched"


@pytest.mark.skipif(not is_root, reason="an overlay over binRoot needs root (CI runs as root)")
def test_a_jobs_overlay_is_volatile(tree: Tree) -> None:
    """A job on a shared tree runs in an overlay mounted ``volatile``: a plain one syncs binRoot's
    whole filesystem when the job's namespace goes, so every job's exit waited for every dirty
    page another job had written (an echo took seconds beside a job unpacking 50,000 files)."""
    show = ["e", "./.", "/bin/cat", "/proc/self/mountinfo"]
    assert tree.gproc(*show).returncode == 0  # the first run caches /bin/cat and its libraries
    r = tree.gproc(*show)
    assert r.returncode == 0, r.stderr
    nodes = labelled(r.stdout)
    assert sorted(nodes) == [f"n{i}" for i in range(1, 9)], r.stdout[-2000:]
    for node, lines in nodes.items():
        root = f"{tree.bin_root}/{node}"
        overlays = [line for line in lines if f" {root} " in line and " - overlay " in line]
        assert overlays, f"{node}: no overlay on {root}:\n" + "\n".join(lines)
        assert all("volatile" in line.split(" - ")[1] for line in overlays), overlays
