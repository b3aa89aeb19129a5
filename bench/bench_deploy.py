"""Benchmark of gproc-deploy over SSH on the Docker harness: first and repeat ``up``.

    python bench/bench_deploy.py [--nodes 80] [--keep]

Brings up the cluster named ``gproc`` with ``--no-daemons`` (containers and sshd only;
replacing a cluster of that name), then runs ``gproc-deploy up 1 N --locale kane`` on the
front-end twice, then a rolling upgrade to a second artifact while jobs keep running. For
each run: its wall time measured inside the front-end (what a user there waits), the bytes
the front-end sent (its eth0 transmit counter: artifact, key, SSH handshakes and commands),
and how many hosts got the artifact. gproc-deploy reports no
per-host timings, so the slowest host is read from the nodes' own files: the time the
artifact's hash file was written (end of its upload) and the time the daemon's pid file was
written (its start), relative to the start of the run; containers share the host's clock.
Memory is the cluster's, as ``docker stats`` counts it, with sshd and no gproc, then with
the deployed tree.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_harness import MIB, TX, memory, print_figures  # noqa: E402

from harness.cluster import Cluster  # noqa: E402
from harness.images import build_images  # noqa: E402

REMOTE_DIR = "/tmp/gproc-deploy"
ARTIFACT = "/root/.local/state/gproc/kane-6666/gproc.pyz"
# Runs the command in the front-end; prints its start (epoch), wall time and status first.
TIMER = """
import subprocess, sys, time
start = time.time()
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(f"{start:.3f} {time.perf_counter() - t:.3f} {proc.returncode}")
sys.stdout.write(proc.stdout + proc.stderr)
"""
# Per node: epoch mtimes of the file written after the upload and after the daemon start.
STAMPS = f"""
import os
for name in ("gproc.pyz.sha256", "slave.pid"):
    print(os.stat(os.path.join("{REMOTE_DIR}", name)).st_mtime)
"""


def deploy_up(cluster: Cluster, nodes: int) -> dict[str, object]:
    """One timed ``gproc-deploy up``; its figures, or exit with its output if it failed."""
    before = int(cluster.exec(["cat", TX]).out)
    argv = ["gproc-deploy", "up", "1", str(nodes), "--locale", "kane"]
    res = cluster.exec(["python3", "-c", TIMER, *argv], timeout=900)
    sent = int(cluster.exec(["cat", TX]).out) - before
    head, _, out = res.out.partition("\n")
    start, took, status = head.split()
    if status != "0":
        sys.exit(f"gproc-deploy up failed (exit {status}):\n{out}")
    uploaded = re.search(r"artifact uploaded to (\d+)", out)
    worst = re.search(r"slowest host (\S+) \(([\d.]+)s over SSH\)", out)
    return {
        "start": float(start),
        "took": float(took),
        "sent": sent,
        "uploaded": int(uploaded[1]) if uploaded else -1,
        "slowest": f"{worst[1]} ({worst[2]} s over SSH)" if worst else "not reported",
    }


def slowest(cluster: Cluster, start: float) -> tuple[str, str]:
    """(latest end of upload, latest daemon start) as ``knN +S s`` after the run's start."""
    stamps: dict[str, list[float]] = {}
    for name, res in cluster.on_nodes(["python3", "-c", STAMPS]).items():
        stamps[name] = [float(line) - start for line in res.lines()]
    uploads = {n: s[0] for n, s in stamps.items() if s}
    starts = {n: s[1] for n, s in stamps.items() if len(s) > 1}
    up = max(uploads, key=uploads.__getitem__)
    st = max(starts, key=starts.__getitem__)
    return f"{up} +{uploads[up]:.1f} s", f"{st} +{starts[st]:.1f} s"


def sshd_rss(cluster: Cluster, node: str) -> float:
    """RSS (MiB) of one node's sshd listener."""
    script = "grep VmRSS /proc/$(cat /run/sshd.pid)/status"
    return int(cluster.exec(["sh", "-c", script], host=node).out.split()[1]) / 1024


SITE2 = "/tmp/gproc-site2"


def rolling_upgrade(cluster: Cluster, nodes: int) -> list[tuple[str, str]]:
    """A second artifact (this code, one line added) deployed over the running tree while a
    client keeps running ``gproc e ./. /bin/true``: the rollout's wall time, the longest any
    node refused new jobs (gproc-deploy says it), and what became of the jobs: ok (all
    nodes), partial (drained nodes left out, said as unreachable), refused (every selected
    node drained) and lost (a node lost mid-job: the goal is 0)."""
    copy = f"rm -rf {SITE2} && cp -r /opt/gproc/site {SITE2}"
    cluster.exec(["sh", "-c", f"{copy} && echo '# v2' >> {SITE2}/gproc/__init__.py"])
    outcomes: dict[str, int] = {"ok": 0, "partial": 0, "refused": 0, "lost": 0, "other": 0}
    done = threading.Event()

    def jobs() -> None:
        while not done.is_set():
            res = cluster.exec(["gproc", "e", "./.", "/bin/true"], timeout=120)
            if "gproc: lost" in res.err:
                outcomes["lost"] += 1
            elif res.status == 0:
                outcomes["ok"] += 1
            elif res.status == 255 and "draining" in res.err:
                outcomes["partial"] += 1
            elif "draining" in res.err:
                outcomes["refused"] += 1
            else:
                outcomes["other"] += 1

    client = threading.Thread(target=jobs, daemon=True)
    client.start()
    main = (
        f"import sys; sys.path.insert(0, {SITE2!r}); "
        "from gproc.deploy.cli import main; sys.exit(main())"
    )
    argv = ["python3", "-c", main, "up", "1", str(nodes), "--locale", "kane"]
    t = time.monotonic()
    res = cluster.exec(argv, timeout=1800)
    took = time.monotonic() - t
    done.set()
    client.join(180)
    if res.status != 0:
        sys.exit(f"the rolling upgrade failed (exit {res.status}):\n{res.out}{res.err}")
    refused = re.search(r"the longest any node refused new jobs: ([\d.]+)s", res.out)
    return [
        (f"rolling upgrade of {nodes} nodes and the master", f"{took:.1f} s"),
        ("  longest time any node refused new jobs", f"{refused[1]} s" if refused else "-"),
        ("  jobs during it: ok / partial / refused / lost / other",
         " / ".join(str(outcomes[k]) for k in ("ok", "partial", "refused", "lost", "other"))),
    ]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=80)
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = p.parse_args()
    cluster = Cluster("gproc")
    build_images(cluster.client)
    t = time.monotonic()
    cluster.up(nodes=args.nodes, daemons=False)
    figures = [("harness up --no-daemons", f"{time.monotonic() - t:.1f} s")]
    try:
        whole, node = memory(cluster)
        figures.append(("memory, cluster with sshd, no gproc", f"{whole:.0f} MiB"))
        figures.append(("memory, one node (median)", f"{node:.1f} MiB"))
        figures.append(("sshd listener RSS, kn1", f"{sshd_rss(cluster, 'kn1'):.1f} MiB"))
        size = int(cluster.exec(["stat", "-c", "%s", "/opt/gproc/gproc.pyz"]).out)
        for run in ("first", "repeat"):
            r = deploy_up(cluster, args.nodes)
            figures.append((f"gproc-deploy up 1 {args.nodes}, {run} run", f"{r['took']:.1f} s"))
            what = f"{r['sent'] / MIB:.1f} MiB, artifact uploaded to {r['uploaded']} hosts"
            figures.append((f"  front-end sent ({run})", what))
            figures.append((f"  slowest host ({run}, gproc-deploy)", str(r["slowest"])))
            if run == "first":
                size = int(cluster.exec(["stat", "-c", "%s", ARTIFACT]).out)
                upload, start = slowest(cluster, float(r["start"]))  # type: ignore[arg-type]
                figures.append(("  last upload done (first)", upload))
                figures.append(("  last daemon started (first)", start))
        figures.append(("artifact size", f"{size / 1024:.0f} KiB"))
        figures += rolling_upgrade(cluster, args.nodes)
        whole, node = memory(cluster)
        figures.append(("memory, cluster with sshd and the tree", f"{whole:.0f} MiB"))
    finally:
        if not args.keep:
            cluster.down(quiet=True)
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
