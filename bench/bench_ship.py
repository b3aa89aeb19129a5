"""Shipping a file through the tree on the Docker harness: this checkout against another.

    python bench/bench_ship.py [--before CHECKOUT] [--mib 32] [--runs 3] [--keep]

Brings up the 80-node KANE cluster once and, for each version of gproc (this checkout, and
``--before``'s if given, taking turns run by run so both see the same machine), times
``gproc e -f big.bin SPEC /bin/true`` with a fresh random file each time (no node has it
cached) to one rack (``1/.``, 20 nodes) and to all 80 (``./.``), and launches of
``/bin/true`` on all 80. It prints medians of the wall time and of the CPU the whole cluster
spent (every container's cgroup, read as ``bench_peers.py`` reads it: on 2 cores shared by
81 containers, a change can cut the CPU well before the wall time shows it), and the ratio
of this checkout to the other. Timings are taken in the front-end container, as a user
there sees them.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_harness import MIB, timed  # noqa: E402
from bench_peers import CpuMeter  # noqa: E402

from harness.cluster import Cluster, run_dir  # noqa: E402
from harness.images import build_images  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
BUILD = "from pathlib import Path; from gproc.deploy.artifact import build_zipapp; "


def install(cluster: Cluster, checkout: Path) -> None:
    """Put ``checkout``'s gproc into every container and restart the daemons with it."""
    opt = run_dir(cluster.name) / "opt"
    pyz = opt / "gproc.pyz"
    code = BUILD + f"build_zipapp(Path({str(pyz)!r}))"
    subprocess.run([_python(checkout), "-c", code], cwd=checkout, check=True, env=_env(checkout))
    site = opt / "site"
    shutil.rmtree(site, ignore_errors=True)
    with zipfile.ZipFile(pyz) as zf:
        zf.extractall(site)
    cluster.start_daemons()


def _python(checkout: Path) -> str:
    """The checkout's own venv when it has one (an editable install elsewhere would win)."""
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _env(checkout: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(checkout))


def ship(cluster: Cluster, meter: CpuMeter, spec: str, mib: int) -> tuple[float, float]:
    """Wall time and the cluster's CPU (s) of one ``-f`` of a fresh file to ``spec``."""
    cluster.exec(["sh", "-c", f"head -c {mib * MIB} /dev/urandom > /root/big.bin"])
    before = meter.read()
    (took,) = timed(cluster, 1, "gproc", "e", "-f", "big.bin", spec, "/bin/true")
    return took, _cpu(meter, before)


def launches(cluster: Cluster, meter: CpuMeter, runs: int) -> tuple[list[float], float]:
    """Wall times of ``runs`` launches of /bin/true on 80 nodes, and the cluster's CPU per
    launch (s)."""
    true = ("gproc", "e", "./.", "/bin/true")
    timed(cluster, 1, *true)  # the nodes cache /bin/true's files
    before = meter.read()
    times = timed(cluster, runs, *true)
    return times, _cpu(meter, before) / runs


def _cpu(meter: CpuMeter, before: dict[str, float] | None) -> float:
    """CPU seconds of every container since ``before``; NaN where cgroups cannot be read."""
    spent = meter.spent(before)
    return spent.total if spent is not None else math.nan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="another gproc checkout to compare with")
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = p.parse_args()
    versions = {"this": HERE}
    if args.before:
        versions["before"] = args.before.resolve()
    cluster = Cluster("gproc")
    build_images(cluster.client)
    cluster.up(nodes=80)
    meter = CpuMeter(cluster)
    results: dict[str, dict[str, list[float]]] = {v: {} for v in versions}
    cpu: dict[str, dict[str, list[float]]] = {v: {} for v in versions}
    try:
        for _ in range(args.runs):
            for name, checkout in versions.items():
                install(cluster, checkout)
                for key, spec in (("rack", "1/."), ("all", "./.")):
                    took, spent = ship(cluster, meter, spec, args.mib)
                    results[name].setdefault(key, []).append(took)
                    cpu[name].setdefault(key, []).append(spent)
                times, spent = launches(cluster, meter, 5)
                results[name].setdefault("launch", []).extend(times)
                cpu[name].setdefault("launch", []).append(spent)
    finally:
        if not args.keep:
            cluster.down(quiet=True)
    labels = {
        "rack": f"-f {args.mib} MiB to one rack (1/., 20 nodes)",
        "all": f"-f {args.mib} MiB to 80 nodes (./.)",
        "launch": "launch /bin/true on 80 nodes (./.)",
    }
    print("wall: median time; cpu: median CPU of every container in the cluster per run")
    for key, label in labels.items():
        for what, figures in (("wall", results), ("cpu", cpu)):
            med = {name: statistics.median(f[key]) for name, f in figures.items()}
            cells = [f"{name} {value:6.2f} s" for name, value in med.items()]
            line = f"{label:42} {what:4}  " + "   ".join(cells)
            if "before" in med:
                line += f"   this/before {med['this'] / med['before']:4.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
