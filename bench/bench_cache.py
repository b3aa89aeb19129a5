"""What it costs a node, per job, to hand a job the cached files it needs, for each way of doing it.

    python bench/bench_cache.py [--runs 60] [--dir /tmp] [--jobs DIR ...]

A job's files come out of the node's cache of blobs (by sha256) into the job's own directory,
and the directory is removed when the job ends; both are paid per job on every node, and 16
nodes share 2 cores in the local benchmark, so CPU time matters as much as the wall time on
the launch path. Two sets of files: /bin/true with its loader and libc (about 2.2 MB) and one
32 MiB file. Each option places every file of the set in a new job directory; the options take
turns job by job (so a busy moment of the machine falls on all alike) and the table gives, in
ms per job, medians over ``--runs`` jobs of:

  place   wall time to put the files in place (on the launch path)
  remove  wall time to remove the job's directory (after the job)
  cpu     CPU time of both

Options:
  link             a hard link to the blob (what the cache did): a job that writes its file
                   writes the blob; unsafe
  link+stamp       a hard link, after comparing (size, mtime_ns, ctime_ns, ino) with what was
                   recorded after the previous link; link() and unlink() change ctime, so the
                   stamp trips on every reuse ("trips") and the blob is re-hashed
  link+sha256      a hard link after re-hashing the blob; safe for the next job only if no
                   earlier job still runs: they share the inode
  copyfile         shutil.copyfile (sendfile on Linux), a copy per job
  copy_file_range  os.copy_file_range, a copy per job made by the kernel (sendfile when the
                   job directory is on another file system: copy_file_range says EXDEV)
  ficlone+cfr      a reflink (FICLONE ioctl) where the file system has them, else as above
  read/write       a copy through user space, 1 MiB at a time
  BlobCache        gproc.cache.BlobCache.copy_out as the slave calls it: a checked fstat of a
                   blob no job can reach, then FICLONE or copy_file_range

With ``--jobs`` the job directories go elsewhere (a tmpfs, say); the link options then need
the blobs on the same file system and are left out when they are not.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gproc.cache import BlobCache  # noqa: E402
from gproc.elf import closure  # noqa: E402

FICLONE = 0x40049409
MIB = 1 << 20
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
Place = Callable[[str, str, int], None]


def sha256(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.digest()


def stamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class Options:
    """One placer per option: ``place(blob, dest, mode)`` for a blob of ``linked``."""

    def __init__(self, cache: BlobCache):
        self.cache = cache  # BlobCache's own blobs: nobody links them
        self.stamps: dict[str, tuple[int, int, int, int]] = {}
        self.trips = self.checks = 0

    def link(self, blob: str, dest: str, mode: int) -> None:
        os.link(blob, dest)

    def link_stamp(self, blob: str, dest: str, mode: int) -> None:
        self.checks += 1
        if self.stamps.get(blob) != stamp(blob):
            self.trips += 1
            if sha256(blob).hex() != os.path.basename(blob):
                raise SystemExit(f"{blob} changed")
        os.link(blob, dest)
        self.stamps[blob] = stamp(blob)  # our own link changed ctime

    def link_sha256(self, blob: str, dest: str, mode: int) -> None:
        if sha256(blob).hex() != os.path.basename(blob):
            raise SystemExit(f"{blob} changed")
        os.link(blob, dest)

    def copyfile(self, blob: str, dest: str, mode: int) -> None:
        shutil.copyfile(blob, dest)
        os.chmod(dest, mode)

    def copy_file_range(self, blob: str, dest: str, mode: int) -> None:
        self._copy(blob, dest, mode, clone=False)

    def ficlone_cfr(self, blob: str, dest: str, mode: int) -> None:
        self._copy(blob, dest, mode, clone=True)

    def read_write(self, blob: str, dest: str, mode: int) -> None:
        with open(blob, "rb") as src, open(dest, "xb") as dst:
            while block := src.read(MIB):
                dst.write(block)
        os.chmod(dest, mode)

    def blobcache(self, blob: str, dest: str, mode: int) -> None:
        if not self.cache.copy_out(bytes.fromhex(os.path.basename(blob)), dest, mode):
            raise SystemExit(f"{blob} is not in the cache")

    @staticmethod
    def _copy(blob: str, dest: str, mode: int, clone: bool) -> None:
        src = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
        dst = os.open(dest, FLAGS, 0o600)
        try:
            if clone:
                try:
                    fcntl.ioctl(dst, FICLONE, src)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                        raise
            size, done = os.fstat(src).st_size, 0
            while done < size:
                try:
                    n = os.copy_file_range(src, dst, size - done, done, done)
                except OSError as e:  # across file systems: sendfile, as BlobCache does
                    if e.errno != errno.EXDEV:
                        raise
                    n = os.sendfile(dst, src, done, size - done)
                if n == 0:
                    raise SystemExit(f"{blob} shrank")
                done += n
            os.fchmod(dst, mode)
        finally:
            os.close(src)
            os.close(dst)


def job(place: Place, blobs: list[str], path: str) -> tuple[float, float, float]:
    """One job: wall seconds to place its files and to remove them; CPU of both."""
    os.mkdir(path)
    c0, t0 = time.thread_time(), time.perf_counter()
    for i, blob in enumerate(blobs):
        place(blob, os.path.join(path, str(i)), 0o755)
    t1 = time.perf_counter()
    shutil.rmtree(path)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, time.thread_time() - c0


def run(options: dict[str, Place], blobs: list[str], work: str, runs: int) -> dict[str, list]:
    """``runs`` jobs per option, taking turns; two warm-up rounds are not counted."""
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in options}
    for n in range(runs + 2):
        for name, place in options.items():
            t = job(place, blobs, os.path.join(work, f"{name.replace('/', '_')}{n}"))
            if n >= 2:
                times[name].append(t)
    return times


def true_files() -> list[str]:
    """/bin/true, its loader and libc, as real files."""
    c = closure("/bin/true")
    picked = [c.program, c.interp] + [o for o in c.objects if "/libc.so" in o]
    return [os.path.realpath(p) for p in picked if p]


def reflinks(top: str, src_path: str) -> str:
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(os.path.join(top, "clone"), FLAGS, 0o600)
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return "reflinks work"
    except OSError as e:
        return f"FICLONE fails ({errno.errorcode.get(e.errno, e.errno)}): no reflinks"
    finally:
        os.close(src)
        os.close(dst)
        os.unlink(os.path.join(top, "clone"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the blobs go")
    ap.add_argument("--jobs", nargs="*", help="where job directories go (default: --dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gproc-bench-cache-", dir=args.dir) as top:
        linked = BlobCache(Path(top) / "linked", 1 << 30)  # the link options' blobs
        cache = BlobCache(Path(top) / "cache", 1 << 30)
        big = os.path.join(top, "big")
        with open(big, "wb") as f:
            f.write(os.urandom(32 * MIB))
        print(f"blobs in {args.dir}: {reflinks(top, big)}")
        sets = {"/bin/true + ld.so + libc": true_files(), "one 32 MiB file": [big]}
        for where in args.jobs or [args.dir]:
            work = tempfile.mkdtemp(prefix="gproc-bench-jobs-", dir=where)
            same_fs = os.stat(work).st_dev == os.stat(top).st_dev
            try:
                for title, files in sets.items():
                    blobs = []
                    for path in files:
                        digest = sha256(path)
                        linked.add(path, digest)
                        cache.add(path, digest)
                        blobs.append(os.path.join(linked.path, digest.hex()))
                    size = sum(os.path.getsize(b) for b in blobs)
                    print(
                        f"\n{title}: {len(blobs)} files, {size / MIB:.2f} MiB; jobs in {where}; "
                        f"median of {args.runs}"
                    )
                    print(f"  {'option':<16} {'place':>8} {'remove':>8} {'cpu':>8}  (ms/job)")
                    opts = Options(cache)
                    options: dict[str, Place] = {}
                    if same_fs:
                        options.update(
                            {
                                "link": opts.link,
                                "link+stamp": opts.link_stamp,
                                "link+sha256": opts.link_sha256,
                            }
                        )
                    options.update(
                        {
                            "copyfile": opts.copyfile,
                            "copy_file_range": opts.copy_file_range,
                            "ficlone+cfr": opts.ficlone_cfr,
                            "read/write": opts.read_write,
                            "BlobCache": opts.blobcache,
                        }
                    )
                    times = run(options, blobs, work, args.runs)
                    for name, jobs in times.items():
                        p, r, c = (statistics.median(t[k] for t in jobs) * 1e3 for k in range(3))
                        note = f"  trips {opts.trips}/{opts.checks}" if name == "link+stamp" else ""
                        print(f"  {name:<16} {p:8.3f} {r:8.3f} {c:8.3f}{note}")
            finally:
                shutil.rmtree(work)


if __name__ == "__main__":
    main()
