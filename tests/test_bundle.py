"""Hostile manifests are refused before anything is written, and nothing lands outside the root."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from gproc.bundle import BundleError, Packer, Unpacker, check_manifest, chunks, total_size
from gproc.cache import BlobCache
from gproc.digest import digest_bytes


def entry(path: str, kind: str = "f", data: bytes = b"", **kw) -> dict:
    e = {
        "p": path,
        "k": kind,
        "m": 0o644,
        "s": len(data) if kind == "f" else 0,
        "h": digest_bytes(data) if kind == "f" else b"",
        "l": "",
    }
    e.update(kw)
    return e


def unpack(
    root: Path,
    raw: list[dict],
    payload: bytes,
    total: int | None = None,
    tag: str = "t1",
    cache: BlobCache | None = None,
) -> None:
    entries = check_manifest(raw, len(payload) if total is None else total)
    u = Unpacker(root, entries, tag, cache)
    try:
        for i in u.needed:
            u.feed(i, payload[: entries[i].size])
            payload = payload[entries[i].size :]
        if not u.complete:
            raise BundleError("bundle ended early")
    finally:
        u.abort()


def files_under(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")}


@pytest.mark.parametrize(
    "raw, message",
    [
        ([entry("../escape", data=b"x")], "climbs out"),
        ([entry("a/../../escape", data=b"x")], "climbs out"),
        ([entry("/etc/passwd", data=b"x")], "absolute path"),
        ([entry("link", "l", l="/etc")], "outside the root"),
        ([entry("a/link", "l", l="../../etc")], "outside the root"),
        ([entry("link", "l", l="sub"), entry("link/x", data=b"x")], "through the symlink"),
        ([entry("dev", "c", data=b"")], "device and special files"),
        ([entry("f", data=b"x", m=0o100644)], "permission bits"),
        ([entry("f", data=b"x"), entry("f", data=b"x")], "twice"),
        ([entry("", data=b"x")], "bad path"),
    ],
)
def test_hostile_manifests_are_refused(tmp_path: Path, raw: list[dict], message: str) -> None:
    root = tmp_path / "root"
    with pytest.raises(BundleError, match=message):
        unpack(root, raw, b"x" * sum(e["s"] for e in raw))
    assert not root.exists()
    assert files_under(tmp_path) == set()


def test_size_lie_in_the_total_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="add up"):
        check_manifest([entry("f", data=b"abc")], 10)


def test_more_bytes_than_the_manifest_are_refused(tmp_path: Path) -> None:
    raw = [entry("f", data=b"abc")]
    entries = check_manifest(raw, 3)
    u = Unpacker(tmp_path / "root", entries, "t1")
    with pytest.raises(BundleError, match="more bytes arrived"):
        u.feed(0, b"abcdef")


def test_bytes_out_of_turn_are_refused(tmp_path: Path) -> None:
    entries = check_manifest([entry("a", data=b"abc"), entry("b", data=b"de")], 5)
    u = Unpacker(tmp_path / "root", entries, "t1")
    with pytest.raises(BundleError, match="out of turn"):
        u.feed(1, b"de")


def test_bytes_that_do_not_match_the_hash_are_refused(tmp_path: Path) -> None:
    raw = [entry("f", data=b"abc")]
    with pytest.raises(BundleError, match="sha256"):
        unpack(tmp_path / "root", raw, b"xyz")
    assert files_under(tmp_path / "root") == set()


def test_preplanted_symlink_cannot_redirect_writes(tmp_path: Path) -> None:
    """A symlink left in binRoot (say by another user) pointing out is not followed."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "lib")
    with pytest.raises(BundleError, match="outside the root"):
        unpack(root, [entry("lib/evil.so", data=b"x")], b"x")
    assert files_under(outside) == set()


def test_round_trip_keeps_modes_symlinks_and_contents(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "d" / "tool").chmod(0o755)
    (src / "d" / "big").write_bytes(os.urandom(700_000))
    os.symlink("tool", src / "d" / "alias")
    packer = Packer()
    packer.add_object("/", str(src / "d" / "alias"))
    packer.add_host_path(str(src / "d" / "big"))
    manifest = packer.manifest()
    root = tmp_path / "root"
    u = Unpacker(root, check_manifest([e.wire() for e in manifest], total_size(manifest)), "t")
    for index, chunk in chunks(manifest, u.needed):
        u.feed(index, chunk)
    assert u.complete
    dest = root / str(src).lstrip("/") / "d"
    assert os.readlink(dest / "alias") == "tool"
    assert (dest / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "tool").stat().st_mode & 0o777 == 0o755
    assert (dest / "big").read_bytes() == (src / "d" / "big").read_bytes()


def test_absolute_symlink_targets_travel_relative(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "real").write_text("r")
    os.symlink(src / "real", src / "abs")
    packer = Packer()
    packer.add_object("/", str(src / "abs"))
    links = [e for e in packer.manifest() if e.kind == "l"]
    assert [e.link for e in links] == ["real"]


def test_cached_files_are_not_shipped_again(tmp_path: Path) -> None:
    """A second job with the same file needs no bytes: the node copies it from its cache."""
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    data = os.urandom(5000)
    raw = [entry("lib/libx.so", data=data), entry("empty", data=b"")]
    first = Unpacker(tmp_path / "job1", check_manifest(raw, len(data)), "a", cache)
    assert first.needed == [0]
    first.feed(0, data)
    assert first.complete
    second = Unpacker(tmp_path / "job2", check_manifest(raw, len(data)), "b", cache)
    assert second.needed == [] and second.complete
    assert (tmp_path / "job2" / "lib" / "libx.so").read_bytes() == data
    (tmp_path / "job2" / "lib" / "libx.so").write_bytes(b"changed by the job, in place")
    third = Unpacker(tmp_path / "job3", check_manifest(raw, len(data)), "c", cache)
    assert third.needed == [], "a job's copy is its own: the blob is untouched"
    assert (tmp_path / "job3" / "lib" / "libx.so").read_bytes() == data


def test_cache_stays_within_its_limit(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 10_000)
    for n in range(6):
        src = tmp_path / f"f{n}"
        src.write_bytes(os.urandom(3000))
        cache.add(str(src), digest_bytes(src.read_bytes()))
    held = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    assert held <= 10_000 and cache.size == held


def test_a_chain_of_links_cannot_climb_out(tmp_path: Path) -> None:
    """Each link is lexically inside; together they reach the parent of the root."""
    raw = [entry("a", "l", l="."), entry("b", "l", l="a/.."), entry("c", "l", l="b/etc")]
    with pytest.raises(BundleError, match="outside the root"):
        unpack(tmp_path / "root", raw, b"")


def test_nul_in_a_link_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="symlink target"):
        check_manifest([entry("l", "l", l="x\0y")], 0)


def test_a_blob_changed_while_no_daemon_watched_is_not_handed_out(tmp_path: Path) -> None:
    data = os.urandom(4000)
    src = tmp_path / "src"
    src.write_bytes(data)
    digest = digest_bytes(data)
    BlobCache(tmp_path / "cache", 1 << 20).add(str(src), digest)
    (tmp_path / "cache" / digest.hex()).write_bytes(b"tampered")
    fresh = BlobCache(tmp_path / "cache", 1 << 20)  # as after a restart of the slave
    assert not fresh.copy_out(digest, str(tmp_path / "out"), 0o644)
    assert not (tmp_path / "out").exists()


def test_f_directories_keep_their_symlinks_and_refuse_broken_ones(tmp_path: Path) -> None:
    tree = tmp_path / "data"
    (tree / "real").mkdir(parents=True)
    (tree / "real" / "f.txt").write_text("content")
    os.symlink("real", tree / "alias")  # a symlink to a directory
    os.symlink(tree, tree / "real" / "loop")  # a loop back up
    packer = Packer()
    packer.add_host_path(str(tree))
    kinds = {e.path.rsplit("/", 1)[-1]: e.kind for e in packer.manifest()}
    assert kinds["alias"] == "l" and kinds["f.txt"] == "f" and kinds["loop"] == "l"
    os.symlink("nowhere", tree / "broken")
    with pytest.raises(BundleError, match="broken symlink"):
        Packer().add_host_path(str(tree))


# ---------------------------------------------------------------- -p=false: straight into binRoot


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything under ``top``: kind, mode, and the bytes or the link target."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel, st = str(path.relative_to(top)), os.lstat(path)
            if path.is_symlink():
                seen[rel] = ("l", os.readlink(path))
            elif path.is_dir():
                seen[rel] = ("d", st.st_mode & 0o7777)
            else:
                seen[rel] = ("f", st.st_mode & 0o7777, path.read_bytes())
    return seen


@pytest.fixture
def bin_root(tmp_path: Path) -> Path:
    """A binRoot holding what an earlier -p=false job left: files, a directory, links."""
    root = tmp_path / "binroot"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "old.so").write_bytes(b"an earlier job's library")
    (root / "usr" / "bin").mkdir()
    (root / "usr" / "bin" / "tool").write_bytes(b"an earlier job's tool")
    os.symlink("usr/lib", root / "lib")
    os.symlink(".", root / "here")
    return root


def refused_leaves_nothing(root: Path, raw: list[dict], payload: bytes, cache=None) -> str:
    """Unpack a bundle that must be refused; binRoot is as it was. The refusal's message."""
    before = snapshot(root)
    entries = check_manifest(raw, sum(e["s"] for e in raw))
    with pytest.raises(BundleError) as refusal:
        u = Unpacker(root, entries, "t9", cache)
        for i in u.needed:
            u.feed(i, payload[: entries[i].size])
            payload = payload[entries[i].size :]
        if not u.complete:
            u.abort()
            raise BundleError("bundle ended early")
    assert snapshot(root) == before
    return str(refusal.value)


def test_refused_chain_of_links_leaves_nothing_in_bin_root(bin_root: Path) -> None:
    raw = [
        entry("opt", "d"),
        entry("opt/x", "d"),
        entry("opt/x/f", data=b"file"),
        entry("a", "l", l="."),
        entry("b", "l", l="a/.."),
        entry("c", "l", l="b/etc"),
    ]
    assert "outside the root" in refused_leaves_nothing(bin_root, raw, b"file")


def test_chain_through_a_link_already_in_bin_root_is_refused(bin_root: Path) -> None:
    """``here -> .`` is an earlier job's; ``up -> here/..`` climbs out through it."""
    raw = [entry("opt", "d"), entry("up", "l", l="here/.."), entry("opt/f", data=b"x")]
    assert "outside the root" in refused_leaves_nothing(bin_root, raw, b"x")


def test_hash_mismatch_leaves_nothing_in_bin_root(bin_root: Path, tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    cached = os.urandom(3000)
    src = tmp_path / "cached"
    src.write_bytes(cached)
    cache.add(str(src), digest_bytes(cached))
    raw = [
        entry("opt", "d"),
        entry("opt/deep", "d"),
        entry("opt/deep/cached.so", data=cached),  # copied out of the cache at once
        entry("opt/deep/empty", data=b""),
        entry("usr/lib/new.so", data=b"good"),
        entry("usr/lib/alias.so", "l", l="new.so"),
        entry("usr/bin/tool", data=b"bad!"),  # an earlier job's file, not to be lost
    ]
    assert "sha256" in refused_leaves_nothing(bin_root, raw, b"good" + b"evil", cache)
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")], "no spool left"


def test_short_bundle_leaves_nothing_in_bin_root(bin_root: Path) -> None:
    raw = [entry("opt", "d"), entry("opt/l", "l", l="f"), entry("opt/f", data=b"abcdef")]
    assert "ended early" in refused_leaves_nothing(bin_root, raw, b"abc")


def test_file_under_a_link_of_the_bundle_through_an_old_link_is_refused(bin_root: Path) -> None:
    """``here/b/f`` is ``b/f`` on disk, and ``b`` is the bundle's symlink."""
    raw = [entry("b", "l", l="usr"), entry("here/b/f", data=b"x")]
    assert "through the symlink" in refused_leaves_nothing(bin_root, raw, b"x")
    assert not (bin_root / "b").exists() and not (bin_root / "usr" / "f").exists()


def test_a_file_in_place_of_a_directory_is_refused_before_anything(bin_root: Path) -> None:
    raw = [entry("opt", "d"), entry("opt/f", data=b"x"), entry("usr/lib", data=b"y")]
    assert "a directory is in its place" in refused_leaves_nothing(bin_root, raw, b"xy")


def test_bin_root_files_are_replaced_when_the_bundle_is_good(bin_root: Path) -> None:
    raw = [entry("usr/bin/tool", data=b"new tool"), entry("lib/new.so", data=b"lib")]
    unpack(bin_root, raw, b"new toollib")
    assert (bin_root / "usr" / "bin" / "tool").read_bytes() == b"new tool"
    assert (bin_root / "usr" / "lib" / "new.so").read_bytes() == b"lib"  # through lib -> usr/lib
    assert (bin_root / "usr" / "lib" / "old.so").read_bytes() == b"an earlier job's library"


def test_a_planted_temporary_name_is_not_written_through(bin_root: Path, tmp_path: Path) -> None:
    """A job that guesses the next job's temporary name and links it to a file outside."""
    outside = tmp_path / "precious"
    outside.write_bytes(b"precious")
    os.link(outside, bin_root / "usr" / "bin" / "tool.gproc-t1")
    os.symlink(outside, bin_root / "usr" / "bin" / "x.gproc-t1")
    unpack(bin_root, [entry("usr/bin/tool", data=b"T"), entry("usr/bin/x", data=b"")], b"T")
    assert outside.read_bytes() == b"precious"
    assert (bin_root / "usr" / "bin" / "tool").read_bytes() == b"T"


def test_concurrent_unpackers_into_one_bin_root_share_new_directories(bin_root: Path) -> None:
    """-p=false jobs in threads at once: all make opt/x/...; none is refused for it."""
    errors: list[Exception] = []

    def job(n: int) -> None:
        data = f"job {n}".encode()
        raw = [entry(f"opt/x/y/{d}", "d") for d in range(20)]
        raw += [entry(f"opt/x/y/{d}/f{n}", data=data) for d in range(20)]
        try:
            unpack(bin_root, raw, data * 20, tag=f"j{n}")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=job, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n in range(8):
        assert (bin_root / "opt" / "x" / "y" / "7" / f"f{n}").read_bytes() == f"job {n}".encode()


def test_a_refused_bundle_in_a_fresh_staging_root_leaves_no_root(tmp_path: Path) -> None:
    """Files are written in place there; a refusal still takes every one of them away."""
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    cached = os.urandom(3000)
    (tmp_path / "src").write_bytes(cached)
    cache.add(str(tmp_path / "src"), digest_bytes(cached))
    stage = tmp_path / "stage"
    stage.mkdir()
    raw = [
        entry("lib", "d"),
        entry("lib/cached.so", data=cached),
        entry("lib/alias.so", "l", l="cached.so"),
        entry("lib/good", data=b"good"),
        entry("lib/bad", data=b"bad!"),
    ]
    with pytest.raises(BundleError, match="sha256"):
        unpack(stage / "job", raw, b"good" + b"evil", total=3008, cache=cache)
    assert os.listdir(stage) == []
