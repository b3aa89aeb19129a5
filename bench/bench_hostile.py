"""A daemon's memory and log under hostile load from peers without the key.

    python bench/bench_hostile.py [--bombs 100] [--flood 2000]

Starts a local tree of 8 (real daemons on loopback), then, against the master's and a rack
master's TCP ports: ``--bombs`` concurrent connections that each announce a 4 MiB frame and
send a msgpack array of 4 million empty maps (decoded naively, about 300 MB each), then a
flood of ``--flood`` connections opened as fast as possible and held. It prints each
daemon's peak resident memory (VmHWM) before and after, how many log lines the attack cost,
and whether the tree still runs ``gproc e ./. /bin/true`` on all 8 nodes. It speaks raw
bytes only, so the same script measures any version of the daemons.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_launch import free_base  # noqa: E402

from gproc.deploy.local import LocalTree, Settings  # noqa: E402

MAPS = 4_000_000
BOMB = struct.pack(">I", 5 + MAPS) + b"\xdd" + struct.pack(">I", MAPS) + b"\x80" * MAPS


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bomb(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(BOMB)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    except OSError:
        pass  # closed on us mid-send: that is the defence working


def flood(port: int, count: int) -> int:
    """Open ``count`` connections and hold them for a few seconds; how many were accepted."""
    held = []
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    time.sleep(3)  # the attack itself: hold the descriptors (no test waits on this)
    for s in held:
        s.close()
    return len(held)


def log_lines(state: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in state.glob("*.log"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bombs", type=int, default=100)
    ap.add_argument("--flood", type=int, default=2000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gproc-hostile-"))
    base = free_base(9)
    settings = Settings(
        cmdport=base,
        uds=str(root / "master.sock"),
        bin_root=str(root / "xproc"),
        racksize=4,
        key=str(root / "cluster.key"),
    )
    tree = LocalTree(settings, state=root / "state")
    tree.up(1, 8, timeout=60, say=lambda _m: None)
    try:
        targets = {"master": base, "n4 (rack master)": base + 4}
        pids = {name: tree.pid(name.split()[0]) for name in targets}
        before = {name: peak_mib(pid) for name, pid in pids.items()}
        lines = log_lines(root / "state")
        t = time.perf_counter()
        with ThreadPoolExecutor(args.bombs) as pool:
            for port in targets.values():
                list(pool.map(bomb, [port] * args.bombs))
        bomb_s = time.perf_counter() - t
        held = {name: flood(port, args.flood) for name, port in targets.items()}
        run = subprocess.run(
            [sys.executable, "-m", "gproc", "-defaultMasterUDS", settings.uds, "-key",
             settings.key, "e", "./.", "/bin/true"],
            capture_output=True, text=True, cwd=root, timeout=120,
        )  # fmt: skip
        print(f"{args.bombs} concurrent 4 MiB msgpack bombs per daemon: {bomb_s:.1f} s")
        for name, pid in pids.items():
            print(
                f"{name:18} peak RSS {before[name]:7.1f} MiB before, {peak_mib(pid):7.1f} after; "
                f"flood: {held[name]} connections held"
            )
        print(f"log lines written during the attack: {log_lines(root / 'state') - lines}")
        print(f"gproc e ./. /bin/true afterwards: exit {run.returncode} {run.stderr.strip()}")
    finally:
        tree.down()


if __name__ == "__main__":
    main()
