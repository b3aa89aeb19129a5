"""Benchmarks on the Docker harness: launch latency, bytes the front-end sends, up, memory.

    python bench/bench_harness.py [--nodes 80] [--runs 10] [--mib 32] [--keep]

Brings up the cluster named ``gproc`` (replacing one of that name: only one KANE fits on
10.1.0.0/16), measures, switches the daemons to the flat kf locale and measures again, then
removes the cluster unless ``--keep``. Timings are taken inside the front-end container, so
they are what a user there sees (Python start of the client included) and carry no
``docker exec`` overhead. Front-end bytes are the front-end's eth0 transmit counter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.cluster import Cluster  # noqa: E402
from harness.images import build_images  # noqa: E402

TIMER = """
import subprocess, sys, time
argv = sys.argv[2:]
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    status = subprocess.run(argv, stdout=subprocess.DEVNULL).returncode
    print(f"{time.perf_counter() - t:.4f} {status}")
"""
TX = "/sys/class/net/eth0/statistics/tx_bytes"
MIB = 1 << 20


def timed(cluster: Cluster, runs: int, *argv: str, cwd: str = "/root") -> list[float]:
    """Wall times of ``argv`` run ``runs`` times on the front-end; a failed run is fatal."""
    res = cluster.exec(["python3", "-c", TIMER, str(runs), *argv], workdir=cwd, timeout=900)
    rows = [line.split() for line in res.lines()]
    if res.status != 0 or len(rows) != runs or any(s != "0" for _, s in rows):
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{res.out}{res.err}")
    return [float(t) for t, _ in rows]


def launch(cluster: Cluster, spec: str, runs: int) -> str:
    timed(cluster, 1, "gproc", "e", spec, "/bin/true")  # warm the nodes' file caches
    times = timed(cluster, runs, "gproc", "e", spec, "/bin/true")
    return f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def ship(cluster: Cluster, spec: str, mib: int) -> str:
    """A fresh random file each time, so no node has it cached."""
    make = f"head -c {mib * MIB} /dev/urandom > /root/big.bin"
    cluster.exec(["sh", "-c", make])
    before = int(cluster.exec(["cat", TX]).out)
    (took,) = timed(cluster, 1, "gproc", "e", "-f", "big.bin", spec, "/bin/true")
    sent = int(cluster.exec(["cat", TX]).out) - before
    return f"{took:.2f} s, front-end sent {sent / MIB:.0f} MiB = {sent / (mib * MIB):.1f}x the file"


def memory(cluster: Cluster) -> tuple[float, float]:
    """(whole cluster, median node) in MiB, as ``docker stats`` counts (page cache excluded)."""

    def used(box) -> float:  # noqa: ANN001
        mem = box.stats(stream=False, one_shot=True)["memory_stats"]
        stats = mem.get("stats", {})
        inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))
        return (mem.get("usage", 0) - inactive) / MIB

    boxes = cluster.containers()
    with ThreadPoolExecutor(8) as ex:
        sizes = dict(zip((b.name for b in boxes), ex.map(used, boxes), strict=True))
    nodes = [v for k, v in sizes.items() if not k.endswith("-cesspool")]
    return sum(sizes.values()), statistics.median(nodes)


def engine_overhead() -> float:
    """RSS (MiB) of the per-container host processes docker stats does not count."""
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            name = (proc / "comm").read_text().strip()
            if name in ("fuse-overlayfs", "containerd-shim", "containerd-shim-runc-v2"):
                rss = next(ln for ln in (proc / "status").read_text().splitlines() if "VmRSS" in ln)
                total += int(rss.split()[1])
        except (OSError, StopIteration):
            continue
    return total / 1024


def print_figures(figures: list[tuple[str, str]]) -> None:
    """One aligned line per figure: name, then value."""
    width = max(len(k) for k, _ in figures)
    for key, value in figures:
        print(f"{key:<{width}}  {value}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=80)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = p.parse_args()
    cluster = Cluster("gproc")
    build_images(cluster.client)  # the images first, so up is timed on its own
    t = time.monotonic()
    cluster.up(nodes=args.nodes)
    up_time = time.monotonic() - t
    figures = [("harness up, 80 nodes (goal < 60 s)", f"{up_time:.1f} s")]
    try:
        kane = launch(cluster, "./.", args.runs)
        figures.append(("launch /bin/true ./. kane (goal ~0.5 s)", kane))
        whole, node = memory(cluster)
        figures.append(("memory, whole cluster (goal < 3 GiB)", f"{whole:.0f} MiB"))
        figures.append(("memory, one node (median)", f"{node:.1f} MiB"))
        figures.append(("host overhead (fuse-overlayfs, shims)", f"{engine_overhead():.0f} MiB"))
        figures.append((f"-f {args.mib} MiB ./. kane (goal ~4x)", ship(cluster, "./.", args.mib)))
        cluster.switch_locale("kf")
        figures.append(("launch /bin/true . kf", launch(cluster, ".", args.runs)))
        figures.append((f"-f {args.mib} MiB . kf (goal ~80x)", ship(cluster, ".", args.mib)))
        whole, _ = memory(cluster)
        figures.append(("memory, whole cluster after shipping", f"{whole:.0f} MiB"))
    finally:
        if not args.keep:
            cluster.down(quiet=True)
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
