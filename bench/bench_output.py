"""Labelled output of one long line, against raw output of the same bytes.

    python bench/bench_output.py [--mib 32] [--chunk-kib 64] [--nodes 1] [--tree]

Feeds the exec client's :class:`gproc.output.Printer` one line of ``--mib`` MiB with no
newline until its end, in chunks of ``--chunk-kib`` KiB as frames bring it, from each of
``--nodes`` nodes interleaved, and writes to /dev/null. Labelling must cost about what raw
output costs: the work per chunk must not grow with what the node printed before.

``--tree`` also times it end to end: a local tree of one node (real daemons on loopback) and
``gproc e 1 /bin/sh -c 'head -c SIZE /dev/zero | tr "\\0" x; echo'``, with and without -raw.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_launch import free_base  # noqa: E402

from gproc.deploy.local import LocalTree, Settings  # noqa: E402
from gproc.output import Printer  # noqa: E402


def run(raw: bool, mib: int, chunk_kib: int, nodes: int) -> float:
    chunk = b"x" * (chunk_kib << 10)
    count = (mib << 20) // len(chunk)
    names = [f"n{i}" for i in range(1, nodes + 1)]
    with open("/dev/null", "wb") as sink:
        printer = Printer(raw=raw, out=sink, err=sink)
        start = time.perf_counter()
        for _ in range(count):
            for name in names:
                printer.output(name, 1, chunk)
        for name in names:
            printer.output(name, 1, b"\n")
            printer.exited(name, 0)
        printer.finish()
        return time.perf_counter() - start


def end_to_end(mib: int) -> tuple[float, float]:
    """Seconds for `gproc e` to print one line of ``mib`` MiB from one node: raw, labelled."""
    with tempfile.TemporaryDirectory(prefix="gproc-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(
            cmdport=free_base(1),
            uds=str(root / "g"),
            bin_root=str(root / "xproc"),
            key=str(root / "key"),
            racksize=1,
            debug=0,
        )
        tree = LocalTree(settings, state=root / "state")
        tree.up(1, 1, timeout=60, say=lambda _m: None)
        script = f"head -c {mib << 20} /dev/zero | tr '\\0' x; echo"
        gproc = [sys.executable, "-m", "gproc", "-defaultMasterUDS", settings.uds]
        gproc += ["-key", str(settings.key), "-racksize", "1"]
        try:
            times = []
            for switches, label in ((["-raw"], b""), ([], b"n1: ")):
                cmd = [*gproc, *switches, "e", "1", "/bin/sh", "-c", script]
                out = root / "out"
                with open(out, "wb") as sink:
                    start = time.perf_counter()
                    subprocess.run(cmd, check=True, cwd=root, stdout=sink)
                    times.append(time.perf_counter() - start)
                size = out.stat().st_size
                if size < (mib << 20) + 1 + len(label):
                    raise SystemExit(f"gproc e {' '.join(switches)} printed only {size} bytes")
            return times[0], times[1]
        finally:
            tree.down()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--chunk-kib", type=int, default=64)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tree", action="store_true", help="also time gproc e on a local tree")
    a = p.parse_args()
    raw = run(True, a.mib, a.chunk_kib, a.nodes)
    labelled = run(False, a.mib, a.chunk_kib, a.nodes)
    what = f"{a.mib} MiB line in {a.chunk_kib} KiB chunks from {a.nodes} node(s)"
    print(f"{what}: raw {raw:.3f} s, labelled {labelled:.3f} s ({labelled / raw:.1f}x)")
    if a.tree:
        raw, labelled = end_to_end(a.mib)
        print(f"gproc e, one {a.mib} MiB line: -raw {raw:.2f} s, labelled {labelled:.2f} s")


if __name__ == "__main__":
    main()
