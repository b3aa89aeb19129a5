"""The node's cache: what a job does to its files never reaches another job, and many jobs may
unpack at once, in threads, sharing one cache that is evicting as they go."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from gproc.bundle import BundleError, Unpacker, check_manifest
from gproc.cache import BlobCache
from gproc.digest import digest_bytes, digest_file

FLIP = bytes(b ^ 0xFF for b in range(256))


def entry(path: str, data: bytes, mode: int = 0o755) -> dict:
    return {"p": path, "k": "f", "m": mode, "s": len(data), "h": digest_bytes(data)}


def unpack(root: Path, files: dict[str, bytes], cache: BlobCache | None, tag: str) -> list[int]:
    """Unpack ``files`` under ``root`` as a node does; the manifest indexes that were shipped."""
    raw = [entry(path, data) for path, data in files.items()]
    entries = check_manifest(raw, sum(len(d) for d in files.values()))
    u = Unpacker(root, entries, tag, cache)
    shipped = list(u.needed)
    for i in u.needed:
        data = files[entries[i].path]
        for at in range(0, len(data), 100_000):  # in chunks, as frames arrive
            u.feed(i, data[at : at + 100_000])
    assert u.complete
    return shipped


def rewrite_in_place(path: Path) -> None:
    """What a job may do to a file it was given: other bytes, same size, times put back."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data.translate(FLIP))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert path.read_bytes() != data or not data


@pytest.fixture
def files() -> dict[str, bytes]:
    return {"lib/libc.so.6": os.urandom(300_000), "bin/prog": os.urandom(20_000)}


def test_a_job_that_rewrites_its_file_does_not_change_the_next_job(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    assert unpack(tmp_path / "jobA", files, cache, "a") == [0, 1]
    for path in files:
        rewrite_in_place(tmp_path / "jobA" / path)
    assert unpack(tmp_path / "jobB", files, cache, "b") == [], "both come from the cache"
    for path, data in files.items():
        assert (tmp_path / "jobB" / path).read_bytes() == data
        assert (tmp_path / "jobB" / path).stat().st_mode & 0o7777 == 0o755


def test_a_job_still_running_cannot_change_a_later_jobs_files(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    """A hash check when the file is handed out would not catch this one: jobs overlap."""
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    unpack(tmp_path / "jobA", files, cache, "a")
    unpack(tmp_path / "jobB", files, cache, "b")
    for path in files:
        rewrite_in_place(tmp_path / "jobA" / path)
    for path, data in files.items():
        assert (tmp_path / "jobB" / path).read_bytes() == data


def test_straight_into_bin_root_a_rewritten_file_is_restored(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    """-p=false: both jobs use binRoot itself; the second gets the manifest's bytes back."""
    cache, root = BlobCache(tmp_path / "cache", 1 << 20), tmp_path / "binroot"
    unpack(root, files, cache, "a")
    for path in files:
        rewrite_in_place(root / path)
    assert unpack(root, files, cache, "b") == []
    for path, data in files.items():
        assert (root / path).read_bytes() == data


def test_a_blob_rewritten_in_the_cache_with_its_times_put_back_is_not_handed_out(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    """A root job can reach the cache directory too; the change moves ctime, so it is seen."""
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    unpack(tmp_path / "jobA", files, cache, "a")
    for data in files.values():
        rewrite_in_place(tmp_path / "cache" / digest_bytes(data).hex())
    assert unpack(tmp_path / "jobB", files, cache, "b") == [0, 1], "shipped again"
    for path, data in files.items():
        assert (tmp_path / "jobB" / path).read_bytes() == data
    assert unpack(tmp_path / "jobC", files, cache, "c") == [], "and cached again"


def test_a_short_write_is_never_taken_for_a_whole_one(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel write part of a buffer, then refuse (EFBIG).

    The file is refused, and the cache keeps no truncated blob under the whole file's hash.
    """
    script = f"""
import os, resource, signal, sys
from gproc.digest import digest_bytes
from pathlib import Path
from gproc.bundle import Unpacker, check_manifest
from gproc.cache import BlobCache
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
cache = BlobCache(Path({str(tmp_path / "cache")!r}), 1 << 20)
data = os.urandom(50_000)
raw = [{{"p": "f", "k": "f", "m": 0o644, "s": len(data), "h": digest_bytes(data)}}]
u = Unpacker(Path({str(tmp_path / "job")!r}), check_manifest(raw, len(data)), "t", cache)
resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
try:
    u.feed(0, data)
except OSError as e:
    print("refused", e.errno)
else:
    print("accepted")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["refused", "27"], done.stdout + done.stderr  # EFBIG
    assert os.listdir(tmp_path / "cache") == []
    assert not (tmp_path / "job" / "f").exists()


def test_concurrent_unpackers_sharing_a_cache_under_eviction_get_their_bytes(
    tmp_path: Path,
) -> None:
    """8 threads, 25 jobs each, random picks of 24 files; the cache holds about a third."""
    rng = random.Random(8)
    pool = {
        f"lib/f{n}.so": rng.randbytes(rng.choice([1, 4096, 60_000, 250_000])) for n in range(24)
    }
    limit = sum(len(d) for d in pool.values()) // 3
    cache = BlobCache(tmp_path / "cache", limit)
    failures: list[str] = []
    shipped: list[int] = []

    def jobs(worker: int) -> None:
        pick = random.Random(worker)
        for n in range(25):
            files = {p: pool[p] for p in pick.sample(sorted(pool), pick.randint(1, 10))}
            root = tmp_path / f"w{worker}" / f"job{n}"
            try:
                shipped.append(len(unpack(root, files, cache, f"{worker}x{n}")))
                for path, data in files.items():
                    if (root / path).read_bytes() != data:
                        failures.append(f"{root / path}: wrong bytes")
                    rewrite_in_place(root / path)  # and the job misbehaves
            except Exception as e:  # reported below, with the others
                failures.append(f"{root}: {e!r}")
            shutil.rmtree(root)

    threads = [threading.Thread(target=jobs, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    blobs = {p.name: p for p in (tmp_path / "cache").iterdir()}
    assert not [name for name in blobs if name.startswith(".")], "no spool left behind"
    for name, path in blobs.items():
        assert digest_file(str(path)).hex() == name
    assert cache.size == sum(p.stat().st_size for p in blobs.values()) <= limit
    assert 0 < sum(shipped) < 8 * 25 * 10, "some files came from the cache, some were shipped"


def test_a_blob_evicted_while_it_is_copied_out_is_copied_whole_or_shipped(
    tmp_path: Path,
) -> None:
    big, other = os.urandom(8 << 20), os.urandom(8 << 20)
    cache = BlobCache(tmp_path / "cache", 9 << 20)  # one of the two at a time
    srcs = []
    for name, data in (("big", big), ("other", other)):
        (tmp_path / name).write_bytes(data)
        srcs.append((str(tmp_path / name), digest_bytes(data)))
    outcomes = set()
    for n in range(20):
        cache.add(*srcs[0])
        evictor = threading.Thread(target=cache.add, args=srcs[1])
        dest = tmp_path / f"out{n}"
        evictor.start()
        got = cache.copy_out(srcs[0][1], str(dest), 0o644)
        evictor.join()
        outcomes.add(got)
        if got:
            assert dest.read_bytes() == big
        else:
            assert not dest.exists()
        cache.add(*srcs[1])  # whichever won, start the next round with "other" cached
    assert True in outcomes


def test_an_evicted_file_is_shipped_and_a_shipped_file_is_in_place_when_needs_are_known(
    tmp_path: Path,
) -> None:
    """Copy-out fails before the unpacker reports its needs, never after."""
    a, b = os.urandom(6000), os.urandom(6000)
    cache = BlobCache(tmp_path / "cache", 10_000)
    unpack(tmp_path / "job1", {"a": a}, cache, "1")
    unpack(tmp_path / "job2", {"b": b}, cache, "2")  # over the limit: a goes
    raw = [entry("a", a), entry("b", b)]
    u = Unpacker(tmp_path / "job3", check_manifest(raw, 12_000), "3", cache)
    assert u.needed == [0]
    shutil.rmtree(tmp_path / "cache")  # the whole cache gone now changes nothing for job3
    os.mkdir(tmp_path / "cache")
    u.feed(0, a)
    assert u.complete
    assert (tmp_path / "job3" / "a").read_bytes() == a
    assert (tmp_path / "job3" / "b").read_bytes() == b


def test_bytes_of_a_refused_file_are_not_cached(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    raw = [entry("f", b"the bytes announced")]
    u = Unpacker(tmp_path / "job", check_manifest(raw, 19), "t", cache)
    with pytest.raises(BundleError, match="sha256"):
        u.feed(0, b"other bytes, as lon")
    assert os.listdir(tmp_path / "cache") == []


def test_a_restarted_cache_forgets_spools_and_counts_its_blobs(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    unpack(tmp_path / "job", {"f": b"x" * 1000}, cache, "t")
    (tmp_path / "cache" / ".in-1-1").write_bytes(b"half a file")  # a killed predecessor's
    again = BlobCache(tmp_path / "cache", 1 << 20)
    assert again.size == 1000
    assert os.listdir(tmp_path / "cache") == [digest_bytes(b"x" * 1000).hex()]


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK),
    reason="no /dev/shm to stage on another file system",
)
def test_jobs_staged_on_another_file_system_get_their_copies(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    """copy_file_range refuses to cross file systems (EXDEV) here: sendfile does it."""
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    unpack(tmp_path / "job1", files, cache, "1")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev
        assert unpack(Path(shm) / "job2", files, cache, "2") == []
        for path, data in files.items():
            assert (Path(shm) / "job2" / path).read_bytes() == data


# ---------------------------------------------------------------- admission: large files


ADMIT = 100_000  # the threshold these tests give their caches: files above it are "large"


def test_a_large_file_is_cached_from_its_second_arrival_and_not_shipped_the_third_time(
    tmp_path: Path,
) -> None:
    """A data file shipped once costs the node no cache copy and pushes nothing out."""
    cache = BlobCache(tmp_path / "cache", 1 << 20, admit_bytes=ADMIT)
    data = {"data.bin": os.urandom(ADMIT + 1)}
    digest = digest_bytes(data["data.bin"])
    assert unpack(tmp_path / "job1", data, cache, "1") == [0]
    assert (tmp_path / "job1" / "data.bin").read_bytes() == data["data.bin"]
    assert (tmp_path / "job1" / "data.bin").stat().st_mode & 0o7777 == 0o755
    assert not cache.holds(digest), "not cached on its first arrival"
    assert os.listdir(tmp_path / "cache") == [], "nothing written in the cache directory"
    assert cache.size == 0

    assert unpack(tmp_path / "job2", data, cache, "2") == [0], "shipped again"
    assert cache.holds(digest), "cached on its second arrival"
    assert (tmp_path / "job2" / "data.bin").read_bytes() == data["data.bin"]
    rewrite_in_place(tmp_path / "job2" / "data.bin")  # the job's copy is its own

    assert unpack(tmp_path / "job3", data, cache, "3") == [], "the third run ships nothing"
    assert (tmp_path / "job3" / "data.bin").read_bytes() == data["data.bin"]


def test_a_small_file_is_cached_on_its_first_arrival_beside_a_large_one_that_is_not(
    tmp_path: Path,
) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20, admit_bytes=ADMIT)
    files = {"bin/prog": os.urandom(ADMIT), "data.bin": os.urandom(ADMIT + 1)}
    assert unpack(tmp_path / "job1", files, cache, "1") == [0, 1]
    assert cache.holds(digest_bytes(files["bin/prog"])), "at the threshold: cached at once"
    assert not cache.holds(digest_bytes(files["data.bin"]))
    assert unpack(tmp_path / "job2", files, cache, "2") == [1], "only the large file again"
    for path, data in files.items():
        assert (tmp_path / "job2" / path).read_bytes() == data


def test_the_default_threshold_is_4_mib_inclusive(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 16 << 20)
    files = {"lib/big.so": os.urandom(4 << 20), "data.bin": os.urandom((4 << 20) + 1)}
    assert unpack(tmp_path / "job", files, cache, "1") == [0, 1]
    assert cache.holds(digest_bytes(files["lib/big.so"]))
    assert not cache.holds(digest_bytes(files["data.bin"]))


def test_a_large_file_whose_bytes_do_not_match_is_not_remembered(tmp_path: Path) -> None:
    """The manifest's digest is a claim: only bytes that match it make the file seen."""
    cache = BlobCache(tmp_path / "cache", 1 << 20, admit_bytes=ADMIT)
    data = os.urandom(ADMIT + 1)
    digest = digest_bytes(data)
    manifest = check_manifest([entry("data.bin", data)], len(data))
    u = Unpacker(tmp_path / "job0", manifest, "0", cache)
    assert u.needed == [0]
    with pytest.raises(BundleError, match="sha256"):
        u.feed(0, os.urandom(len(data)))  # other bytes under the claimed digest
    assert not (tmp_path / "job0").exists(), "a refused file leaves nothing behind"
    assert os.listdir(tmp_path / "cache") == []

    files = {"data.bin": data}
    assert unpack(tmp_path / "job1", files, cache, "1") == [0]
    assert not cache.holds(digest), "the refused arrival did not count: this is the first"
    assert unpack(tmp_path / "job2", files, cache, "2") == [0]
    assert cache.holds(digest), "the second arrival that matched is cached"
    assert unpack(tmp_path / "job3", files, cache, "3") == []


def test_the_large_files_remembered_are_bounded_oldest_forgotten_first(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20, admit_bytes=ADMIT, seen=4)
    pool = [{f"data{n}.bin": os.urandom(ADMIT + 1)} for n in range(5)]
    for n, files in enumerate(pool):  # five distinct large files for a set of four
        assert unpack(tmp_path / f"once{n}", files, cache, f"o{n}") == [0]
    assert not cache.holds(digest_bytes(*pool[4].values()))

    assert unpack(tmp_path / "again4", pool[4], cache, "a4") == [0]
    assert cache.holds(digest_bytes(*pool[4].values())), "the last one seen is remembered"
    assert unpack(tmp_path / "again0", pool[0], cache, "a0") == [0]
    assert not cache.holds(digest_bytes(*pool[0].values())), "the oldest one is forgotten"
    assert unpack(tmp_path / "third0", pool[0], cache, "t0") == [0]
    assert cache.holds(digest_bytes(*pool[0].values())), "seen again now: cached"


def test_by_default_the_last_1024_large_files_are_remembered(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    size = (4 << 20) + 1
    digests = [n.to_bytes(32, "big") for n in range(1025)]
    for d in digests:
        assert not cache.admits(size, d)
        cache.saw(size, d)
    assert not cache.admits(size, digests[0]), "the oldest of 1025 is forgotten"
    assert all(cache.admits(size, d) for d in digests[1:])
