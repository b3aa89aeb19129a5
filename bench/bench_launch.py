"""Launch latency on a local tree, against the cost of forking the same processes directly.

    python bench/bench_launch.py [--nodes 16] [--racksize 4] [--runs 20]

Starts a local tree (real daemons on loopback), times ``gproc e ./. /bin/true`` end to end
(client start, ELF closure, shipping, fan-out, exits) over several runs, next to the time
this machine takes to fork and wait the same number of ``/bin/true`` in one process, and
reports the resident memory of an idle slave and of the master. Goals: launch within 10x of
the fork baseline; an idle slave under 30 MB.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gproc.deploy.local import LocalTree, Settings


def free_base(count: int) -> int:
    for base in range(31000, 60000, 97):
        try:
            for port in range(base, base + count + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise SystemExit("no free block of loopback ports")


def fork_baseline(n: int) -> float:
    t = time.perf_counter()
    procs = [subprocess.Popen(["/bin/true"]) for _ in range(n)]
    for p in procs:
        p.wait()
    return time.perf_counter() - t


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_ms(pid: int | None) -> float:
    """User plus system CPU time a process has used so far."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def spread(xs: list[float]) -> str:
    xs = sorted(xs)
    return (
        f"median {statistics.median(xs) * 1000:7.1f} ms  min {xs[0] * 1000:7.1f}  "
        f"max {xs[-1] * 1000:7.1f}  stdev {statistics.pstdev(xs) * 1000:5.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--racksize", type=int, default=4)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gproc-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(
            cmdport=free_base(args.nodes),
            uds=str(root / "g"),
            bin_root=str(root / "xproc"),
            racksize=args.racksize,
            key=str(root / "key"),
            debug=0,
        )
        tree = LocalTree(settings, state=root / "state")
        tree.up(1, args.nodes, timeout=60, say=lambda _m: None)
        try:
            report(tree, settings, args, root)
        finally:
            tree.down()


def report(tree: LocalTree, settings: Settings, args: argparse.Namespace, root: Path) -> None:
    gproc = [
        sys.executable,
        "-m",
        "gproc",
        "-defaultMasterUDS",
        settings.uds,
        "-key",
        str(settings.key),
    ]
    cmd = [*gproc, "e", "./.", "/bin/true"]
    subprocess.run(cmd, check=True, cwd=root)  # warm the page cache
    names = ["master", *(f"n{i}" for i in range(1, args.nodes + 1))]
    before = {n: cpu_ms(tree.pid(n)) for n in names}
    launches = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=root)
        launches.append(time.perf_counter() - t)
    spent = {n: (cpu_ms(tree.pid(n)) - before[n]) / args.runs for n in names}
    startup = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        startup.append(time.perf_counter() - t)
    forks = [fork_baseline(args.nodes) for _ in range(args.runs)]
    ratio = statistics.median(launches) / statistics.median(forks)
    slaves = [tree.pid(f"n{i}") for i in range(1, args.nodes + 1)]
    leaf = next(p for i, p in enumerate(slaves, 1) if i % args.racksize and p)
    print(
        f"local tree: {args.nodes} nodes, rack size {args.racksize}, {args.runs} runs, "
        f"{os.cpu_count()} cores"
    )
    print(f"gproc e ./. /bin/true   {spread(launches)}")
    print(f"fork+wait {args.nodes} x true   {spread(forks)}")
    print(f"python3 -c pass         {spread(startup)}   (interpreter start, inside the above)")
    print(f"launch / fork baseline  {ratio:5.1f}x   (goal: within 10x)")
    print(f"idle slave RSS          {rss_mib(leaf):5.1f} MiB (goal: under 30 MB)")
    print(f"rack master RSS         {rss_mib(tree.pid(f'n{args.racksize}')):5.1f} MiB")
    print(f"master RSS              {rss_mib(tree.pid('master')):5.1f} MiB")
    racks = [n for n in names[1:] if int(n[1:]) % args.racksize == 0]
    leaves = [n for n in names[1:] if n not in racks]
    print(
        f"CPU per launch          master {spent['master']:.1f} ms, rack master "
        f"{statistics.mean(spent[n] for n in racks):.1f} ms, leaf "
        f"{statistics.mean(spent[n] for n in leaves):.1f} ms, all daemons "
        f"{sum(spent.values()):.0f} ms"
    )


if __name__ == "__main__":
    main()
