"""gproc against its peers on the Docker harness: pdsh, ClusterShell and Slurm, 80 nodes.

    python -m harness up                # the 80-node KANE cluster (builds the images)
    python bench/bench_peers.py [--runs 7] [--mib 32]

Attaches to the running cluster (as ``bench_ship.py`` does, but without replacing it),
configures Slurm for it (one fresh munge key, munged everywhere, slurmctld on the front-end,
slurmd on kn1..kn80) and measures, from the front-end, taking turns run by run so every
tool sees the same machine:

- launch: ``/bin/true`` on 80 nodes with ``gproc e ./.``, ``pdsh -R ssh``, ``clush`` and
  ``srun -N80 -n80`` (one untimed run of each first);
- data: a file of ``--mib`` MiB (fresh random bytes for every tool and run, so no cache
  helps) to 80 nodes with ``gproc cp``, ``gproc e -f``, ``pdcp``, ``clush --copy`` and
  ``sbcast`` (only sbcast is timed, inside an ``salloc -N80``), and with ``gproc cp`` to one
  rack (``1/.``); wall time and the bytes the front-end sent (its interfaces' tx_bytes) as a
  multiple of the file. Every copy is checked (size and sha256 on each node) and removed;
- correctness: each tool's ``hostname`` output on 80 nodes, self-labelled (``kn7: kn7``).

Beside the tools, the data section has the floor: ``bare_tree.py`` (in this directory) sends
the file down gproc's tree shape with plain sockets and writes, to 80 nodes and to one rack,
with no framing, authentication, digest or flow control, and once more to 80 nodes with the
one SHA-256 pass per node that gproc's nodes make (``bare + sha256``). What it takes is about
the least any copy through this tree can take on these containers, so it says how far a goal
is from what the harness allows at all; it is printed under the goals.

It prints one table (median, min, max, front-end bytes, peer time / gproc time, and the CPU
the whole cluster spent: every container's cgroup, read on the host, so the daemons, the
jobs and the kernel's work for them all count) and the issue's goals, each met or missed.
A missed goal is not an error (exit 0); a tool that fails or prints the wrong output is
(exit 1, naming it). Slurm and munge are stopped and their files removed afterwards, also on
errors and Ctrl-C: the containers are left as they were found.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_harness import MIB  # noqa: E402

from harness.cluster import Cluster, HarnessError, Result  # noqa: E402

WORK = "/tmp/bench-peers"  # on every container: Slurm and munge config, state, logs, pids
CONF = f"{WORK}/slurm.conf"
MUNGE_DIR = f"{WORK}/munge"  # munge's key, pid, seed and log: owned by munge
MUNGE_SOCKET_DIR = "/run/munge"  # the clients' default socket lives here
SSH_CONFIG = f"{WORK}/ssh_config"
SRC = "/root/bench-peers.bin"  # the file shipped, on the front-end
DEST = "/tmp/bench-peers.bin"  # where it lands on the nodes
BIN_ROOT = "/tmp/xproc"  # gproc's binRoot on the nodes: a job sees a shipped file under it
CACHE = BIN_ROOT + ".cache"  # gproc's node cache
NODES = "kn[1-80]"
SLURM_ENV = f"SLURM_CONF={CONF}"
PDSH = ["pdsh", "-R", "ssh", "-f", "80", "-w", NODES]
CLUSH = ["clush", "-f", "80", "-w", NODES, "-o", f"-F {SSH_CONFIG}"]
SRUN = ["srun", "-N80", "-n80"]
READY = 120.0  # seconds for Slurm to show every node idle
FRONT_TOOLS = ("pdsh", "pdcp", "clush", "munged", "slurmctld", "srun", "sbcast", "salloc")
NODE_TOOLS = ("pdcp", "munged", "slurmd")
BARE = f"{WORK}/bare_tree.py"  # the floor: see bare_tree.py's docstring
BARE_PORT = 7999
BARE_TREES = {"all": f"{WORK}/tree-all.json", "rack": f"{WORK}/tree-rack.json"}

# Run on the front-end: time one command, capture its output, count the bytes sent.
TIMER = """
import json, os, subprocess, sys, time
def tx():
    total = 0
    for dev in os.listdir("/sys/class/net"):
        if dev != "lo":
            with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
                total += int(f.read())
    return total
before, t = tx(), time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
took, sent = time.perf_counter() - t, tx() - before
print(json.dumps({"t": took, "sent": sent, "rc": p.returncode, "out": p.stdout, "err": p.stderr}))
"""


class BenchError(RuntimeError):
    """A tool failed or printed the wrong thing; the message names it and what to do."""


@dataclass
class Run:
    """One timed command: wall seconds, front-end bytes sent, its output."""

    took: float
    sent: int
    out: str


@dataclass
class Cpu:
    """CPU seconds spent during one run: by every container, and by the front-end alone.

    The front-end's share includes the benchmark's own timer (a python3 started by
    ``docker exec``, about the same for every tool)."""

    total: float
    front: float


class CpuMeter:
    """Reads the CPU time of every container of the cluster from its cgroup on the host.

    On 2 cores shared by 81 containers a run's wall time follows the CPU all of them spend,
    so this is where the time of a tool goes. cgroup v1 (``cpuacct.usage``, nanoseconds) and
    v2 (``cpu.stat``'s ``usage_usec``), with the cgroupfs or the systemd driver; where no
    file is readable (another engine, a rootless one) the column says ``-``.
    """

    def __init__(self, cluster: Cluster):
        found = {box.name: _cgroup_cpu_file(box.id) for box in cluster.containers()}
        self.files = {name: path for name, path in found.items() if path is not None}
        if len(self.files) < len(found):  # a sum over some containers would mislead
            self.files = {}
        self.front = cluster.container_name(cluster.require_plan().front_end)

    def read(self) -> dict[str, float] | None:
        """CPU seconds so far, by container name; None where cgroups are not readable."""
        if not self.files:
            return None
        try:
            return {name: _cpu_seconds(path) for name, path in self.files.items()}
        except (OSError, ValueError):
            return None

    def spent(self, before: dict[str, float] | None) -> Cpu | None:
        after = self.read()
        if before is None or after is None:
            return None
        used = {name: after[name] - before[name] for name in after}
        return Cpu(sum(used.values()), used[self.front])


def _cgroup_cpu_file(cid: str) -> Path | None:
    for path in (
        f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage",
        f"/sys/fs/cgroup/cpu,cpuacct/docker/{cid}/cpuacct.usage",
        f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat",
        f"/sys/fs/cgroup/docker/{cid}/cpu.stat",
    ):
        if os.access(path, os.R_OK):
            return Path(path)
    return None


def _cpu_seconds(path: Path) -> float:
    text = path.read_text()
    if path.name == "cpuacct.usage":
        return int(text) / 1e9
    usec = next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec"))
    return int(usec) / 1e6


@dataclass
class Row:
    """One line of the table: a tool doing one thing, over all runs."""

    tool: str
    what: str
    ref: str | None  # the gproc row it is compared with, if any
    times: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    cpu: list[Cpu] = field(default_factory=list)
    nodes: int = 80  # the nodes the tool reaches

    def median(self) -> float:
        return statistics.median(self.times)

    def note_cpu(self, cpu: Cpu | None) -> None:
        if cpu is not None:
            self.cpu.append(cpu)

    def cpu_cells(self) -> str:
        """Median CPU of the whole cluster (s), and of a node besides the front-end (ms)."""
        if not self.cpu:
            return f"{'-':>7} {'-':>8}"
        total = statistics.median(c.total for c in self.cpu)
        node = statistics.median((c.total - c.front) / self.nodes for c in self.cpu)
        return f"{total:6.2f}s {node * 1e3:6.1f}ms"


# ---------------------------------------------------------------------- running commands


def front(cluster: Cluster, script: str, timeout: float = 300) -> Result:
    """A shell script on the front-end, in /root."""
    return cluster.exec(["sh", "-c", script], workdir="/root", timeout=timeout)


def must(res: Result, what: str) -> str:
    if res.status != 0:
        raise BenchError(f"{what} failed (exit {res.status}):\n{tail(res.out + res.err)}")
    return res.out


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def timed(cluster: Cluster, argv: list[str], what: str, prefix: list[str] | None = None) -> Run:
    """Run ``argv`` once on the front-end under the timer (inside ``prefix``, if given)."""
    cmd = [*(prefix or []), "python3", "-c", TIMER, *argv]
    res = cluster.exec(["env", SLURM_ENV, *cmd], workdir="/root", timeout=900)
    last = res.lines()[-1] if res.lines() else ""
    if res.status != 0 or not last.startswith("{"):
        raise BenchError(f"{what} failed (exit {res.status}):\n{tail(res.out + res.err)}")
    got = json.loads(last)
    if got["rc"] != 0:
        raise BenchError(f"{what} failed (exit {got['rc']}):\n{tail(got['out'] + got['err'])}")
    return Run(got["t"], got["sent"], got["out"])


# ---------------------------------------------------------------------- Slurm and munge


def check_images(cluster: Cluster) -> None:
    """Every tool is installed where it runs, or say how to get it."""
    probe = "for t in {}; do command -v $t >/dev/null || echo $t; done"
    missing = set(front(cluster, probe.format(" ".join(FRONT_TOOLS))).out.split())
    for res in cluster.on_nodes(["sh", "-c", probe.format(" ".join(NODE_TOOLS))]).values():
        missing |= set(res.out.split())
    if missing:
        raise BenchError(
            f"the images lack {', '.join(sorted(missing))}: rebuild them and restart the "
            "cluster with python -m harness images && python -m harness up"
        )


def slurm_conf(cluster: Cluster, cpus: int) -> str:
    """Front-end as controller, every node by address, root everywhere, no cgroups."""
    plan = cluster.require_plan()
    lines = [
        "ClusterName=kane",
        f"SlurmctldHost={plan.front_end}({plan.front_end_address})",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={WORK}/slurmctld",
        f"SlurmdSpoolDir={WORK}/slurmd",
        f"SlurmctldPidFile={WORK}/slurmctld.pid",
        f"SlurmdPidFile={WORK}/slurmd.pid",
        f"SlurmctldLogFile={WORK}/slurmctld.log",
        f"SlurmdLogFile={WORK}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "MinJobAge=10",
        "KillWait=5",
        "InactiveLimit=0",
        "MailProg=/bin/true",  # none here; the default path does not exist
    ]
    lines += [f"NodeName={n.name} NodeAddr={n.address} CPUs={cpus}" for n in plan.nodes]
    lines.append("PartitionName=all Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def ssh_config(cluster: Cluster) -> str:
    """Non-interactive ssh with the harness's key, every node's name mapped to its address."""
    head = [
        "Host *",
        "  User root",
        "  BatchMode yes",
        "  StrictHostKeyChecking yes",
        "  UserKnownHostsFile /root/.ssh/known_hosts",
        "  IdentityFile /root/.ssh/id_ed25519",
        "  ConnectTimeout 10",
        "  LogLevel ERROR",
    ]
    hosts = [f"Host {n.name}\n  HostName {n.address}" for n in cluster.require_plan().nodes]
    return "\n".join(hosts + head) + "\n"  # ssh takes the first value it finds: hosts first


def work_archive(files: dict[str, bytes]) -> bytes:
    """A tar of ``WORK`` holding ``files`` (name -> bytes), to unpack in /tmp."""
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w") as tar:
        top = tarfile.TarInfo(WORK.removeprefix("/tmp/"))
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(top)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top.name}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o600, now
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# munged must run as munge and finds its key, pid, seed and log in MUNGE_DIR; the clients
# (srun, slurmd...) reach it at the default socket.
START_MUNGE = f"""
mkdir -p {MUNGE_DIR} {MUNGE_SOCKET_DIR}
mv {WORK}/munge.key {MUNGE_DIR}/munge.key
chown -R munge:munge {MUNGE_DIR} {MUNGE_SOCKET_DIR}
chmod 0700 {MUNGE_DIR}; chmod 0400 {MUNGE_DIR}/munge.key; chmod 0755 {MUNGE_SOCKET_DIR}
runuser -u munge -- /usr/sbin/munged --key-file={MUNGE_DIR}/munge.key \
  --pid-file={MUNGE_DIR}/munged.pid --seed-file={MUNGE_DIR}/munged.seed \
  --log-file={MUNGE_DIR}/munged.log
"""
START_SLURMD = f"mkdir -p {WORK}/slurmd && slurmd -f {CONF}"
START_BARE = (
    f"setsid python3 {BARE} serve {BARE_PORT} </dev/null >{WORK}/bare_tree.log 2>&1 & "
    f"echo $! >{WORK}/bare_tree.pid"
)
START_SLURMCTLD = f"mkdir -p {WORK}/slurmctld && slurmctld -f {CONF}"
# Stop what a pid file names (only if it still is that daemon), wait up to 10 s for it.
STOP = """
stop() {{ p=$(cat "$1" 2>/dev/null) && grep -q "$2" /proc/$p/cmdline 2>/dev/null || return 0
  kill $p; i=0; while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  kill -9 $p 2>/dev/null; }}
stop {work}/slurmd.pid slurmd; stop {work}/slurmctld.pid slurmctld
stop {work}/bare_tree.pid bare_tree.py
stop {munge}/munged.pid munged
rm -rf {work} {sock} {dest}
"""


def start_slurm(cluster: Cluster) -> None:
    """One fresh munge key and the config everywhere, munged everywhere, then the daemons."""
    plan = cluster.require_plan()
    cpus = int(must(cluster.exec(["nproc"], host=plan.nodes[0].name), "nproc on a node"))
    files = {
        "slurm.conf": slurm_conf(cluster, cpus).encode(),
        "munge.key": _random_key(),
        "ssh_config": ssh_config(cluster).encode(),
        "bare_tree.py": (Path(__file__).resolve().parent / "bare_tree.py").read_bytes(),
        **{Path(path).name: tree.encode() for path, tree in bare_trees(cluster).items()},
    }
    archive = work_archive(files)
    hosts = [plan.front_end, *(n.name for n in plan.nodes)]

    def start(host: str) -> Result:
        put_work(cluster, host, archive)
        daemon = START_SLURMCTLD if host == plan.front_end else f"{START_BARE}\n{START_SLURMD}"
        return cluster.exec(["sh", "-ec", START_MUNGE + daemon], host=host, timeout=60)

    for host, res in zip(hosts, cluster.pool(start, hosts), strict=True):
        must(res, f"starting munged and Slurm on {host} (its logs: {WORK} there)")
    wait_idle(cluster, len(plan.nodes))


def bare_trees(cluster: Cluster) -> dict[str, str]:
    """The bare tree's shape, as gproc's: every rack master with its nodes, and the first
    rack alone (the nodes ``gproc cp 1/.`` reaches), as JSON by the path it is read from."""
    plan = cluster.require_plan()
    racks = {
        master.address: [node.address for node in plan.children(master.name)]
        for master in plan.levels()[0]
    }
    first = next(iter(racks.items()))
    return {
        BARE_TREES["all"]: json.dumps(racks),
        BARE_TREES["rack"]: json.dumps(dict([first])),
    }


def put_work(cluster: Cluster, host: str, archive: bytes) -> None:
    """Unpack ``archive`` in /tmp of ``host``. Not ``put_archive``: /tmp is a tmpfs, and the
    engine writes archives into the container's layer beneath the mount, unseen."""
    cmd = ["docker", "exec", "-i", cluster.container_name(host), "tar", "-x", "-C", "/tmp"]
    proc = subprocess.run(cmd, input=archive, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"cannot put {WORK} on {host}: {proc.stderr.decode().strip()}")


def _random_key() -> bytes:
    with open("/dev/urandom", "rb") as f:
        return f.read(1024)


def wait_idle(cluster: Cluster, count: int) -> None:
    """Poll sinfo until it shows ``count`` idle nodes, or fail naming what it showed."""
    deadline = time.monotonic() + READY
    seen = ""
    while time.monotonic() < deadline:
        res = front(cluster, f"env {SLURM_ENV} sinfo -h -N -t idle -o %N | sort -u | wc -l")
        if res.status == 0 and res.out.strip() == str(count):
            return
        seen = front(cluster, f"env {SLURM_ENV} sinfo -h -o '%D %t'").out.strip() or res.err
        time.sleep(0.5)
    raise BenchError(
        f"Slurm did not show {count} idle nodes within {READY:.0f}s (sinfo: {seen!r}); "
        f"see {WORK}/slurmctld.log on the front-end and {WORK}/slurmd.log on the nodes"
    )


def stop_slurm(cluster: Cluster) -> None:
    """Every Slurm and munge daemon stopped and every file of ours removed, everywhere."""
    plan = cluster.require_plan()
    script = STOP.format(work=WORK, munge=MUNGE_DIR, sock=MUNGE_SOCKET_DIR, dest=DEST)
    hosts = [plan.front_end, *(n.name for n in plan.nodes)]
    cluster.pool(lambda h: cluster.exec(["sh", "-c", script], host=h, timeout=60), hosts)
    front(cluster, f"rm -f {SRC}")


# ---------------------------------------------------------------------- correctness


def check_labels(tool: str, out: str, names: list[str]) -> str | None:
    """None when ``out`` is exactly one ``NAME: NAME`` line per node; else what is wrong."""
    seen: dict[str, str] = {}
    for line in out.splitlines():
        label, _, host = line.partition(": ")
        if label in seen:
            return f"{label} printed twice"
        seen[label] = host.strip()
    wrong = [f"{k}: {v}" for k, v in seen.items() if k != v]
    missing = sorted(set(names) - set(seen), key=_node_number)
    extra = sorted(set(seen) - set(names))
    if wrong or missing or extra:
        return f"wrong {wrong[:5]}, missing {missing[:10]}, unexpected {extra[:5]}"
    return None


def _node_number(name: str) -> int:
    return int(name.removeprefix("kn")) if name.startswith("kn") else 0


def correctness(cluster: Cluster) -> dict[str, str | None]:
    """Each tool's hostname on 80 nodes, self-labelled; tool -> None (pass) or the problem."""
    names = [n.name for n in cluster.require_plan().nodes]
    node_name = ["sh", "-c", 'echo "$SLURMD_NODENAME: $(hostname)"']
    commands = {
        "gproc": ["gproc", "e", "./.", "/bin/hostname"],
        "pdsh": [*PDSH, "hostname"],
        "clush": [*CLUSH, "hostname"],
        "srun": [*SRUN, *node_name],
    }
    return {
        tool: check_labels(tool, timed(cluster, argv, f"{tool} hostname").out, names)
        for tool, argv in commands.items()
    }


# ---------------------------------------------------------------------- launch and data


def launch_commands() -> dict[str, list[str]]:
    return {
        "gproc": ["gproc", "e", "./.", "/bin/true"],
        "pdsh": [*PDSH, "/bin/true"],
        "clush": [*CLUSH, "/bin/true"],
        "srun": [*SRUN, "/bin/true"],
    }


@dataclass(frozen=True)
class Copy:
    """How one tool puts SRC on the nodes, and where the nodes then hold it."""

    argv: list[str]
    nodes: str  # "all" or "rack"
    prefix: list[str] = field(default_factory=list)
    # gproc e -f: the file lives only as long as the job, so a second job ships it again and
    # prints its sha256 as every node's job sees it (the timed job's exit status already says
    # that every node matched every chunk against the client's digests)
    seen_by_job: bool = False


def copy_commands() -> dict[str, Copy]:
    salloc = ["salloc", "-N80", "--quiet"]
    return {
        "gproc cp": Copy(["gproc", "cp", "./.", SRC, DEST], "all"),
        "gproc e -f": Copy(["gproc", "e", "-f", SRC, "./.", "/bin/true"], "all", seen_by_job=True),
        "pdcp": Copy(["pdcp", *PDSH[1:], SRC, DEST], "all"),
        "clush --copy": Copy([*CLUSH, "--copy", SRC, "--dest", DEST], "all"),
        "sbcast": Copy(["sbcast", "--force", SRC, DEST], "all", prefix=salloc),
        "gproc cp 1/.": Copy(["gproc", "cp", "1/.", SRC, DEST], "rack"),
        "bare tree": Copy(bare_argv("all"), "all"),
        "bare + sha256": Copy([*bare_argv("all"), "sha256"], "all"),
        "bare tree 1/.": Copy(bare_argv("rack"), "rack"),
    }


def bare_argv(nodes: str) -> list[str]:
    return ["python3", BARE, "send", BARE_TREES[nodes], SRC, DEST, str(BARE_PORT)]


def fresh_file(cluster: Cluster, mib: int) -> str:
    """New random bytes at SRC on the front-end; returns their sha256."""
    script = f"head -c {mib * MIB} /dev/urandom > {SRC} && sha256sum {SRC}"
    return must(front(cluster, script), "making the random file").split()[0]


def verify_and_clean(cluster: Cluster, tool: str, copy: Copy, digest: str, size: int) -> None:
    """Every node meant to have the file holds it whole; then every copy is removed."""
    plan = cluster.require_plan()
    names = [n.name for n in plan.nodes]
    wanted = names[:20] if copy.nodes == "rack" else names
    # gproc names a cached blob by its own digest (gproc/digest.py), not the file's sha256:
    # the blob is found by its sha256 among the cache's few files
    blob = f"$(sha256sum {CACHE}/* 2>/dev/null | awk '$1 == \"{digest}\" {{print $2; exit}}')"
    if copy.seen_by_job:
        shipped = f"{BIN_ROOT}{SRC}"
        seen = must(
            front(
                cluster,
                f"gproc e -f {SRC} ./. /bin/sh -c 'stat -c %s {shipped}; sha256sum {shipped}'",
            ),
            f"{tool}: the check job",
        )
        said = {n: "" for n in names}
        for line in seen.splitlines():
            node, _, text = line.partition(": ")
            said[node] = said.get(node, "") + text + "\n"
    # every gproc copy may also leave a blob in the node cache (in RAM on the harness): removed
    check = f'stat -c %s {DEST} && sha256sum {DEST}; rm -f {DEST} "{blob}"'
    results = cluster.on_nodes(["sh", "-c", check], names)
    front(cluster, f'rm -f "{blob}"')
    if not copy.seen_by_job:
        said = {n: results[n].out for n in names}
    bad = [n for n in wanted if said[n].splitlines()[:1] != [str(size)] or digest not in said[n]]
    if bad:
        raise BenchError(f"{tool}: the file did not arrive whole on {', '.join(bad[:10])}")


def measure(cluster: Cluster, runs: int, mib: int) -> list[Row]:
    """Launch and data rows, every tool taking its turn in each run."""
    meter = CpuMeter(cluster)
    launches = launch_commands()
    rows = {
        t: Row(t, "launch /bin/true, 80 nodes", None if t == "gproc" else "gproc") for t in launches
    }
    for tool, argv in launches.items():
        timed(cluster, argv, f"{tool} launch (warm-up)")
    for _ in range(runs):
        for tool, argv in launches.items():
            before = meter.read()
            rows[tool].times.append(timed(cluster, argv, f"{tool} launch").took)
            rows[tool].note_cpu(meter.spent(before))
    copies = copy_commands()
    for tool, copy in copies.items():
        nodes = 20 if copy.nodes == "rack" else 80
        what = f"{mib} MiB to " + ("one rack (20 nodes)" if nodes == 20 else "80 nodes")
        ref = None if tool.startswith("gproc") else "gproc cp 1/." if nodes == 20 else "gproc cp"
        rows[tool] = Row(tool, what, ref, nodes=nodes)
    for _ in range(runs):
        for tool, copy in copies.items():
            digest = fresh_file(cluster, mib)
            before = meter.read()
            run = timed(cluster, copy.argv, tool, copy.prefix)
            rows[tool].note_cpu(meter.spent(before))
            verify_and_clean(cluster, tool, copy, digest, mib * MIB)
            rows[tool].times.append(run.took)
            rows[tool].sent.append(run.sent)
    return list(rows.values())


# ---------------------------------------------------------------------- report


def table(rows: list[Row], mib: int) -> str:
    """One line per row: tool, what, median/min/max, front-end bytes, ratio to gproc."""
    by_tool = {r.tool: r for r in rows}
    head = (
        f"{'tool':14} {'what':30} {'median':>8} {'min':>8} {'max':>8}  {'fe sent':>8}  "
        f"{'ratio':>6}  {'cpu all':>7} {'per node':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        sent = f"{statistics.median(r.sent) / (mib * MIB):7.2f}x" if r.sent else f"{'-':>8}"
        ratio = f"{r.median() / by_tool[r.ref].median():6.1f}x" if r.ref else "     -"
        cells = " ".join(f"{v:7.2f}s" for v in (r.median(), min(r.times), max(r.times)))
        lines.append(f"{r.tool:14} {r.what:30} {cells}  {sent}  {ratio}  {r.cpu_cells()}")
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[tuple[str, bool, str]]:
    """The issue's goals: (goal, met, the figure)."""
    med = {r.tool: r.median() for r in rows}

    def faster(peer: str, ref: str, factor: float) -> tuple[str, bool, str]:
        got = med[peer] / med[ref]
        return f"{ref} >= {factor:g}x faster than {peer}", got >= factor, f"{got:.1f}x"

    rack = med["gproc cp"] / med["gproc cp 1/."]
    data = [  # cp leaves the file where pdcp and sbcast do; e -f is what the issue timed
        faster(peer, ref, factor)
        for ref in ("gproc cp", "gproc e -f")
        for peer, factor in zip(PEERS, (5, 5, 2), strict=True)
    ]
    return [
        *data,
        ("gproc cp: 80 nodes <= 3x one rack", rack <= 3, f"{rack:.2f}x"),
        faster("pdsh", "gproc", 20),
        faster("clush", "gproc", 20),
        faster("srun", "gproc", 5),
    ]


def floor(rows: list[Row]) -> list[tuple[str, str]]:
    """What the bare tree reaches on the goals' measures, without and with the SHA-256 pass
    gproc's nodes make: (measure, figure)."""
    med = {r.tool: r.median() for r in rows}
    found = [("bare tree: 80 nodes / one rack", f"{med['bare tree'] / med['bare tree 1/.']:.2f}x")]
    for bare in ("bare tree", "bare + sha256"):
        found += [(f"{bare} faster than {peer}", f"{med[peer] / med[bare]:.1f}x") for peer in PEERS]
        found += [
            (f"{t} / {bare}", f"{med[t] / med[bare]:.1f}x") for t in ("gproc cp", "gproc e -f")
        ]
    return found


PEERS = ("pdcp", "clush --copy", "sbcast")


def report(rows: list[Row], checks: dict[str, str | None], mib: int, runs: int) -> None:
    print(f"\n{runs} runs each, taking turns; fe sent = front-end tx bytes / file size")
    print(
        "cpu all = CPU of every container during the run (median); per node = that less the "
        "front-end's, per node reached"
    )
    print(table(rows, mib))
    print("\ncorrectness (hostname on 80 nodes, self-labelled):")
    for tool, problem in checks.items():
        print(f"  {tool:6} {'pass' if problem is None else 'FAIL: ' + problem}")
    print("\ngoals:")
    for goal, met, got in goals(rows):
        print(f"  {goal:44} {got:>7}  {'met' if met else 'MISSED'}")
    print("\nthe floor (bare_tree.py: sockets and writes, no framing, MAC or flow control):")
    for measure, got in floor(rows):
        print(f"  {measure:44} {got:>7}")


def with_slurm(cluster: Cluster, body: Callable[[], None]) -> None:
    """Run ``body`` with Slurm up; stop Slurm and munge whatever happens (Ctrl-C too)."""
    try:
        start_slurm(cluster)
        body()
    finally:
        stop_slurm(cluster)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per tool (default 7)")
    p.add_argument("--mib", type=int, default=32, help="size of the file shipped (MiB)")
    args = p.parse_args()
    if args.runs < 1 or args.mib < 1:
        p.error("--runs and --mib must be at least 1")
    cluster = Cluster("gproc")
    rows: list[Row] = []
    checks: dict[str, str | None] = {}

    def body() -> None:
        checks.update(correctness(cluster))
        rows.extend(measure(cluster, args.runs, args.mib))

    try:
        cluster.attach()
        if len(cluster.require_plan().nodes) != 80:
            raise BenchError("the benchmark needs the 80-node cluster: python -m harness up")
        check_images(cluster)
        with_slurm(cluster, body)
    except (BenchError, HarnessError) as error:
        print(f"bench_peers: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_peers: interrupted; Slurm and munge were stopped", file=sys.stderr)
        return 130
    report(rows, checks, args.mib, args.runs)
    failed = [t for t, problem in checks.items() if problem is not None]
    if failed:
        print(f"bench_peers: wrong output from {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
