"""1,000 nodes on one host (the harness's netns backend): registration, memory, launch,
shipping through the tree, and a rack master killed mid-job. Prints figures and goals.

    sudo .venv/bin/python bench/bench_netns.py [--nodes 1000] [--locale kane] [--runs 5]
                                               [--ship-racks 3] [--ship-mib 32] [--keep]

Goals (DESIGN.md section 8, issue 11):
  registration    every node registered in under 3 minutes (2 cores)
  memory          the whole cluster (sum of PSS of every daemon and the zygote) under 16 GiB
  launch          ``gproc e ./. /bin/true`` on every node in under 3 s, median of --runs
                  (after one warm-up run that fills the nodes' caches)
  shipping        the front-end sends a file at most once per first-level master it goes to
                  (bytes counted on the front-end namespace's eth0)
  lost rack       a rack master killed mid-job is reported within 5 s; every other node
                  finishes

Shipping goes to the first ``--ship-racks`` racks (``1-K/.``), not to all nodes: every node
keeps its own copy of the file in RAM (/dev/shm staging, plus its cache once a file over
4 MiB arrives a second time), and 1,000 copies of 32 MiB are more than this machine holds.
The front-end's share does not depend on how many nodes sit below each rack master, which is
what the tree is for.

Timings include starting the client (``nsenter`` into the front-end, a Python start).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.checks import Running  # noqa: E402
from harness.netns import NetnsCluster, smaps  # noqa: E402
from harness.waiting import wait_until  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20


def used_memory() -> int:
    """MemTotal - MemAvailable: what the host has given to everything, kernel included."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def tx_bytes(net: NetnsCluster) -> int:
    """Bytes sent on the front-end namespace's eth0 (its only link into the tree)."""
    argv = ["ip", "-n", net.ns(net.require_plan().front_end), "-j", "-s", "link", "show", "eth0"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def timed(net: NetnsCluster, argv: list[str], timeout: float = 600) -> tuple[float, int, str]:
    t = time.monotonic()
    res = net.exec(argv, timeout=timeout)
    return time.monotonic() - t, res.status, res.err


def cpu_seconds(pids: list[int]) -> float:
    """CPU used so far by these daemons and the jobs they have reaped (user + system)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def bench_memory(net: NetnsCluster, before: int, when: str) -> None:
    mem = net.memory()
    plan = net.require_plan()
    slaves = [mem[n.name] for n in plan.nodes if n.name in mem]
    uss = [u for u, _ in slaves]
    pss = [p for _, p in slaves]
    zygote_pss = sum(smaps(pid)[1] for pid in _zygote_pid(net))
    total = sum(p for _, p in mem.values()) + zygote_pss
    master = mem.get(plan.front_end, (0, 0))
    print(
        f"memory {when}: slave USS mean {statistics.mean(uss) / MIB:.2f} MiB "
        f"(max {max(uss) / MIB:.2f}), PSS mean {statistics.mean(pss) / MIB:.2f} MiB; "
        f"master USS {master[0] / MIB:.1f} MiB"
    )
    shm = _du(net.data)
    print(
        f"memory {when}: sum of PSS of {len(mem)} daemons and the zygote {total / GIB:.2f} GiB "
        f"(goal < 16 GiB: {verdict(total < 16 * GIB)}); host memory used rose by "
        f"{(used_memory() - before) / GIB:.2f} GiB (kernel namespaces and links, and "
        f"{shm / GIB:.2f} GiB of node files in /dev/shm, included)"
    )


def _zygote_pid(net: NetnsCluster) -> list[int]:
    daemons = set(net.pids().values())
    from harness.netns import zygote_pids

    return [pid for pid in zygote_pids(net.name) if pid not in daemons]


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def bench_launch(net: NetnsCluster, runs: int) -> None:
    n = len(net.require_plan().nodes)
    cold, status, err = timed(net, ["gproc", "e", "./.", "/bin/true"])
    assert status == 0, err[-2000:]
    times = []
    for _ in range(runs):
        took, status, err = timed(net, ["gproc", "e", "./.", "/bin/true"])
        assert status == 0, err[-2000:]
        times.append(took)
    median = statistics.median(times)
    print(
        f"launch: gproc e ./. /bin/true on {n} nodes: first (ships, fills caches) {cold:.2f} s,"
        f" then median of {runs} {median:.2f} s ({', '.join(f'{t:.2f}' for t in times)})"
        f" (goal < 3 s: {verdict(median < 3)})"
    )
    pids = list(net.pids().values())
    cpu = cpu_seconds(pids)
    took, status, _ = timed(net, ["gproc", "e", "./.", "/bin/true"])
    used = cpu_seconds(pids) - cpu
    cpu = cpu_seconds(pids)
    local, status, _ = timed(net, ["gproc", "e", "-localbin", "./.", "/bin/true"])
    used_local = cpu_seconds(pids) - cpu
    print(
        f"launch: CPU of the daemons and their jobs per launch: {used:.1f} s "
        f"({used / n * 1e3:.1f} ms a node; wall {took:.2f} s); with -localbin (nothing shipped "
        f"or copied) {used_local:.1f} s, wall {local:.2f} s; load now {os.getloadavg()[0]:.0f}"
    )


def subtree(plan, name: str) -> list[str]:  # noqa: ANN001 - a harness Plan
    found, todo = [], [name]
    while todo:
        kids = [c.name for c in plan.children(todo.pop())]
        found += kids
        todo += kids
    return found


def bench_ship(net: NetnsCluster, racks: int, mib: int) -> None:
    plan = net.require_plan()
    first = [n for n in plan.nodes if n.level == 1][:racks]
    depth = max(n.level for n in plan.nodes)
    spec = f"1-{len(first)}" + "/." * (depth - 1)
    blob = net.data / "ship.bin"
    with open(blob, "wb") as f:
        f.write(os.urandom(mib * MIB))
    reached = len(first) + sum(len(subtree(plan, m.name)) for m in first)
    before = tx_bytes(net)
    took, status, err = timed(net, ["gproc", "e", "-f", str(blob), spec, "/bin/true"])
    sent = tx_bytes(net) - before
    assert status == 0, err[-2000:]
    bound = len(first) * mib * MIB
    print(
        f"ship: {mib} MiB with -f to {spec} ({reached} nodes under {len(first)} first-level "
        f"masters) in {took:.2f} s; the front-end sent {sent / MIB:.1f} MiB = "
        f"{sent / (mib * MIB):.2f}x the file for {len(first)} masters "
        f"(goal <= {len(first)}x plus framing: {verdict(sent <= bound * 1.02)})"
    )
    blob.unlink()


def bench_specs(net: NetnsCluster) -> None:
    """Specs at depth on a tree of three levels or more: how many nodes each selects."""
    plan = net.require_plan()
    depth = max(n.level for n in plan.nodes)
    if depth < 3:
        return
    for spec in ("./.", "./././.", "2/3/.", "1/./."):
        took, status, err = timed(net, ["gproc", "e", "-b", spec, "/bin/true"])
        res = net.exec(["gproc", "e", spec, "/bin/hostname"], timeout=600)
        count = len(res.lines())
        print(f"spec {spec}: {count} nodes answered (exit {res.status}); /bin/true {took:.2f} s")
    res = net.exec(["gproc", "i"])
    print(f"gproc i on {len(plan.nodes)} nodes: {len(res.lines())} lines:")
    print("\n".join("  " + line[:100] for line in res.lines()[:8]) + "\n  ...")


def bench_lost_rack(net: NetnsCluster) -> None:
    plan = net.require_plan()
    n = len(plan.nodes)
    depth = max(m.level for m in plan.nodes)
    # a rack master: a parent on the level above the leaves
    victim = next(m for m in plan.nodes if m.level == depth - 1 and plan.children(m.name))
    below = set(subtree(plan, victim.name)) | {victim.name}
    everyone = "." + "/." * (depth - 1)
    gate = net.data / "gate"
    gate.touch()
    with open(gate) as hold:
        fcntl.flock(hold, fcntl.LOCK_EX)  # every job waits for it with flock -s
        script = f"echo started; flock -s {gate} true; echo finished"
        job = Running(net, "e", everyone, "sh", "-c", script)
        try:
            wait_until(
                lambda: job.saying("started"),
                300,
                f"the job started on all {n} nodes",
                done=lambda seen: len(seen) == n,
                interval=0.2,
            )
            os.kill(net.pids()[victim.name], 9)
            killed = time.monotonic()
            wait_until(
                lambda: "".join(job._err),
                60,
                f"{victim.name} reported lost",
                done=lambda err: "lost" in err and victim.name in err,
                interval=0.02,
            )
            reported = time.monotonic() - killed
        finally:
            fcntl.flock(hold, fcntl.LOCK_UN)
        res = job.wait(300)
    finished = job.saying("finished")
    rest = {m.name for m in plan.nodes} - below
    print(
        f"lost rack: {victim.name} killed with {n} nodes in a job: reported lost after "
        f"{reported:.2f} s (goal < 5 s: {verdict(reported < 5)}); {len(finished & rest)} of "
        f"{len(rest)} other nodes finished, exit status {res.status} "
        f"({verdict(finished >= rest and res.status == 255)})"
    )
    net.heal(timeout=300)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--locale", default="kane", choices=("kane", "kf", "kane3"))
    p.add_argument("--racksize", type=int)
    p.add_argument("--runs", type=int, default=5, help="launches to time (0: none)")
    p.add_argument("--ship-racks", type=int, default=3)
    p.add_argument("--ship-mib", type=int, default=32)
    p.add_argument("--name", default="nbench")
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench_netns: needs root and iproute2", file=sys.stderr)
        return 2
    net = NetnsCluster(args.name)
    net.down(quiet=True)
    before = used_memory()
    print(f"host: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} before the run")
    try:
        t = time.monotonic()
        net.up(args.nodes, args.locale, args.racksize, timeout=600)
        took = time.monotonic() - t
        print(
            f"up: {args.nodes} nodes ({args.locale}) wired and registered in {took:.1f} s "
            f"(wiring {net.timings['wire']:.1f} s, registration {net.timings['register']:.1f} s)"
            f" (goal < 180 s: {verdict(took < 180)})"
        )
        bench_memory(net, before, "after up")
        bench_specs(net)
        if args.runs > 0:
            bench_launch(net, args.runs)
            bench_memory(net, before, "after the launches")
        if args.ship_racks > 0:
            bench_ship(net, args.ship_racks, args.ship_mib)
        bench_lost_rack(net)
    finally:
        if not args.keep:
            net.down(quiet=True)
            left = net.leftovers()
            print(f"down: {left or 'nothing left behind'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
