"""Launch latency on a local tree, against the cost of forking the same processes directly.

    python bench/bench_launch.py [--nodes 16] [--racksize 4] [--runs 20]

Starts a local tree (real daemons on loopback), times ``gproc e ./. /bin/true`` end to end
(client start, ELF closure, shipping, fan-out, exits) over several runs, next to the time
this machine takes to fork and wait the same number of ``/bin/true`` in one process, and
reports the resident memory of an idle slave and of the master, the CPU each daemon and the
client spend per launch, and the client's own start (imports and packing the program) with
and without its closure cache. Goals: launch within 10x of the fork baseline; an idle slave
under 30 MB.

The tree and the client run the gproc of the checkout this file is in.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gproc
from gproc.deploy.daemons import with_gproc_on_path  # noqa: E402
from gproc.deploy.local import LocalTree, Settings  # noqa: E402

PACK = (
    "import time; t = time.perf_counter(); from gproc.client import ExecOptions, build_job; "
    "build_job(ExecOptions(spec='./.', argv=['/bin/true'])); print(time.perf_counter() - t)"
)


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
    """User plus system CPU time a daemon has used so far, with its job launcher's (a child
    that forks the jobs for it: gproc.spawner); the jobs' own CPU is not counted."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    for child in _children(pid):
        try:
            inner = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(inner[11]) + int(inner[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def children_cpu() -> float:
    """User plus system CPU time of the children waited for so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def client_start(root: Path, warm: bool, runs: int = 5) -> list[float]:
    """Seconds a fresh interpreter takes to import the client and pack /bin/true: with the
    closure cache filled by an earlier run (``warm``), or with an empty one each time."""
    times = []
    for i in range(runs):
        cache = root / ("xdg-warm" if warm else f"xdg-cold-{i}")
        env = dict(with_gproc_on_path(os.environ), XDG_CACHE_HOME=str(cache))
        if warm and i == 0:
            subprocess.run([sys.executable, "-c", PACK], env=env, check=True, capture_output=True)
        out = subprocess.run([sys.executable, "-c", PACK], env=env, check=True, capture_output=True)
        times.append(float(out.stdout))
    return times


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
    env = with_gproc_on_path(os.environ)
    subprocess.run(cmd, check=True, cwd=root, env=env)  # warm the page cache
    names = ["master", *(f"n{i}" for i in range(1, args.nodes + 1))]
    before = {n: cpu_ms(tree.pid(n)) for n in names}
    client_before = children_cpu()
    launches = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=root, env=env)
        launches.append(time.perf_counter() - t)
    spent = {n: (cpu_ms(tree.pid(n)) - before[n]) / args.runs for n in names}
    client = (children_cpu() - client_before) * 1000 / args.runs
    cold, warm = client_start(root, warm=False), client_start(root, warm=True)
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
    print(f"client CPU per launch   {client:.1f} ms (gproc e: interpreter, packing, the job)")
    print(f"client import + pack    {spread(cold)}   (no closure cache)")
    print(f"  with the closure cache  {spread(warm)}")


if __name__ == "__main__":
    main()
