"""The netns backend: an emulated KANE of 1,000 and more nodes on one host, no containers.

Every node is the real ``gproc s`` (forked from :mod:`harness.zygote`, which calls gproc's own
``main`` with a slave's switches) in a network namespace of its own at its locale address and
a UTS namespace whose hostname is the node's name, so ``/bin/hostname`` prints ``knN`` and the
kane locales find the node by its hostname as on the real cluster. The front-end's namespace
runs ``gproc m``. The host's root filesystem is shared; each node has its own binRoot (and so
its own staging and cache directories, which the slave puts beside binRoot) under
``/tmp/gph-NAME/knN/``. Private mounts (``-p``) work as on a real node: the slave makes a
mount namespace per job.

Wiring follows the tree the locale computes (``harness/plan.py``): every parent (the
front-end, each row master, each rack master) has a Linux bridge, and each of its children
is joined to it by a veth pair (``eth0`` in the child). A parent's own end on its bridge is
``eth1`` (``eth0`` on the front-end). The bridges and the switch-side veth ends live in one
more namespace (``gph-NAME-switch``), so nothing of a cluster appears in the host's own
namespace and deleting the namespaces deletes every link. Addresses are /32 with routes: a
node reaches its parent on-link over ``eth0`` (its default route), a parent reaches each
child on-link over ``eth1`` and the child's subtree through the child, and parents forward,
so traffic crosses the namespaces of the masters in between, as it crosses the rack masters
on KANE.

The links are made with plain iproute2 (``ip -batch``: one process for all namespaces, one
for every link of the switch, one per node for its addresses and routes); pyroute2 would save
the per-node ``ip`` processes (about 3 ms each) but is one more dependency for a few seconds
out of minutes.

Everything a cluster makes carries the prefix ``gph-NAME-`` (namespaces ``gph-NAME-kn5``,
``gph-NAME-cesspool``, ``gph-NAME-switch``; directories ``/run/gph-NAME`` and
``/tmp/gph-NAME``; the zygote's command line), so ``down`` cleans up a crashed run by name
alone: it kills every process inside those namespaces and the zygote, deletes the
namespaces and removes the directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import zygote
from .cluster import HarnessError, Result
from .host import ToolMissing
from .images import say
from .plan import KANE_SUBNET, Node, Plan, PlanError, make_plan

PREFIX = "gph"
NETNS_DIR = Path("/run/netns")
SWITCH = "switch"
READY_TIMEOUT = float(os.environ.get("GPROC_HARNESS_TIMEOUT", "300"))
POOL = 8  # parallel `ip` processes while wiring
FAULTS = ("kill", "stop", "cut", "heal")
RESPAWN = 2.0  # seconds between restarts of daemons still missing (start_daemons)


def run_dir(name: str) -> Path:
    """Key, master socket, zygote socket, state and the daemons' logs (tmpfs under /run)."""
    return Path(os.environ.get("GPROC_NETNS_RUNDIR", "/run")) / f"{PREFIX}-{name}"


def data_dir(name: str) -> Path:
    """The nodes' binRoots (and so their staging and cache directories): $GPROC_NETNS_DATA,
    else /dev/shm (RAM, as a KANE node's ramdisk root; on ext4 the inodes of 1,000 staging
    directories per launch cost a tenth of its CPU), else the temporary directory."""
    base = os.environ.get("GPROC_NETNS_DATA")
    if base is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return Path(base) / f"{PREFIX}-{name}"


def data_dirs(name: str) -> list[Path]:
    """Every place a cluster of this name may have kept node files (GPROC_NETNS_DATA may
    have differed at up), so down removes them all."""
    bases = {os.environ.get("GPROC_NETNS_DATA"), "/dev/shm", tempfile.gettempdir()}
    return [Path(b) / f"{PREFIX}-{name}" for b in sorted(filter(None, bases))]


def check_host() -> None:
    """Root, iproute2, nsenter and unshare: or ToolMissing naming what is missing."""
    if os.geteuid() != 0:
        raise ToolMissing("the netns backend needs root (network and UTS namespaces)")
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"the netns backend needs {tool!r} (iproute2 / util-linux)")


def _ip(args: list[str], batch: Iterable[str] | None = None, check: bool = True) -> str:
    """Run ``ip ARGS`` (with ``-batch -`` and these lines when given); a failure names it."""
    argv = ["ip", *args]
    text = None
    if batch is not None:
        argv += ["-batch", "-"]
        text = "\n".join(batch) + "\n"
    proc = subprocess.run(argv, input=text, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} failed: {proc.stderr.strip()[:500]}")
    return proc.stdout


def _pool(fn: Callable, items: Iterable, workers: int = POOL) -> list:
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))


class NetnsCluster:
    """One named netns cluster; ``up`` makes it, every other method works on what exists."""

    backend = "netns"

    def __init__(self, name: str = "gproc"):
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.]{0,23}", name):
            raise PlanError(f"bad cluster name {name!r}: up to 24 letters, digits, '_', '.'")
        self.name = name
        self.plan: Plan | None = None
        self.run_id = ""
        self.dir = run_dir(name)
        self.data = data_dir(name)
        self.timings: dict[str, float] = {}  # seconds of the last up: wire, register
        self.heartbeat: float | None = None  # -heartbeat of the daemons; None: gproc's own

    # ------------------------------------------------------------------ names

    def ns(self, host: str) -> str:
        return f"{PREFIX}-{self.name}-{host}"

    def ns_path(self, host: str) -> str:
        return str(NETNS_DIR / self.ns(host))

    @property
    def uds(self) -> str:
        return str(self.dir / "master.sock")

    @property
    def key(self) -> str:
        return str(self.dir / "cluster.key")

    @property
    def zygote_socket(self) -> str:
        return str(self.dir / "zygote.sock")

    def log(self, host: str) -> Path:
        return self.dir / "log" / f"{host}.log"

    def bin_root(self, host: str) -> str:
        return str(self.data / host / "xproc")

    def require_plan(self) -> Plan:
        if self.plan is None:
            self.attach()
        assert self.plan is not None
        return self.plan

    def attach(self) -> NetnsCluster:
        """Load the plan of a running cluster from its state file."""
        state = self.dir / "cluster.json"
        if not state.exists():
            raise HarnessError(
                f"no netns cluster {self.name!r}: "
                "start it with python -m harness up --backend netns"
            )
        s = json.loads(state.read_text())
        self.plan = make_plan(s["locale"], s["nodes"], KANE_SUBNET, s.get("rack_size"))
        self.heartbeat = s.get("heartbeat")
        self.run_id = s["run"]
        return self

    @staticmethod
    def exists(name: str) -> bool:
        """A state file or anything left with this cluster's prefix."""
        if (run_dir(name) / "cluster.json").exists():
            return True
        prefix = f"{PREFIX}-{name}-"
        return NETNS_DIR.is_dir() and any(p.name.startswith(prefix) for p in NETNS_DIR.iterdir())

    # ------------------------------------------------------------------ up

    def up(
        self,
        nodes: int = 80,
        locale: str = "kane",
        rack_size: int | None = None,
        timeout: float = READY_TIMEOUT,
        heartbeat: float | None = None,
    ) -> NetnsCluster:
        """Replace any cluster of this name with a fresh one whose every daemon registered.

        ``heartbeat`` (seconds, the daemons' -heartbeat) lets a test see a stopped or cut
        node lost sooner than gproc's default of 4 silent beats of 5 s."""
        self.plan = plan = make_plan(locale, nodes, KANE_SUBNET, rack_size)
        if heartbeat is not None and heartbeat <= 0:
            raise PlanError(f"bad heartbeat {heartbeat}: give seconds > 0")
        self.heartbeat = heartbeat
        names = {n.name for n in plan.nodes} | {plan.front_end}
        orphans = [n.name for n in plan.nodes if n.parent not in names]
        if orphans:
            raise PlanError(
                f"{len(orphans)} nodes would hang under a parent that is not in the cluster "
                f"({orphans[0]} under {plan.node(orphans[0]).parent}): give a node count "
                "that fills the last rack"
            )
        check_host()
        self.down(quiet=True)
        self.run_id = uuid.uuid4().hex[:12]
        t0 = time.monotonic()
        try:
            self._prepare_dirs()
            self.wire()
            took = self.timings["wire"] = time.monotonic() - t0
            say(f"{self.name!r}: {len(plan.nodes) + 2} namespaces wired in {took:.1f}s")
            self.start_zygote()
            self.timings["register"] = self.start_daemons(timeout=timeout)
        except BaseException:
            say(f"up of {self.name!r} failed; removing what was created")
            self.down(quiet=True)
            raise
        return self

    def _prepare_dirs(self) -> None:
        plan = self.require_plan()
        (self.dir / "log").mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "gproc", "-key", self.key, "k"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise HarnessError(f"cannot create the cluster key {self.key}: {proc.stderr.strip()}")
        state = {
            "locale": plan.locale,
            "nodes": len(plan.nodes),
            "rack_size": plan.rack_size,
            "heartbeat": self.heartbeat,
            "run": self.run_id,
        }
        (self.dir / "cluster.json").write_text(json.dumps(state))
        # `exec` puts this first on PATH: a plain `gproc e ...` then talks to this master
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "gproc"
        wrapper.write_text(
            f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gproc "
            f"-defaultMasterUDS {shlex.quote(self.uds)} -key {shlex.quote(self.key)} "
            f'-locale {plan.locale} "$@"\n'
        )
        wrapper.chmod(0o755)

    # ------------------------------------------------------------------ wiring

    def parents(self) -> list[str]:
        """Every host with children: the front-end first, then inner nodes."""
        plan = self.require_plan()
        inner = {n.parent for n in plan.nodes}
        return [plan.front_end, *(n.name for n in plan.nodes if n.name in inner)]

    def wire(self) -> None:
        """Namespaces, bridges, veth pairs, addresses and routes (module doc)."""
        plan = self.require_plan()
        hosts = [plan.front_end, *(n.name for n in plan.nodes)]
        _ip([], (f"netns add {self.ns(h)}" for h in [SWITCH, *hosts]))
        parents = self.parents()
        sw: list[str] = []
        for p in parents:
            peer = "eth0" if p == plan.front_end else "eth1"
            mac = self.mac(p, down=True)
            sw += [
                f"link add b-{p} type bridge",
                f"link set b-{p} up",
                f"link add d-{p} type veth peer name {peer} address {mac} netns {self.ns(p)}",
                f"link set d-{p} master b-{p} up",
            ]
        for n in plan.nodes:
            mac, where = self.mac(n.name, down=False), self.ns(n.name)
            sw += [
                f"link add u-{n.name} type veth peer name eth0 address {mac} netns {where}",
                f"link set u-{n.name} master b-{n.parent} up",
            ]
        _ip(["-n", self.ns(SWITCH)], sw)
        self._bridges_skip_iptables()
        _pool(lambda h: _ip(["-n", self.ns(h)], self._host_lines(h)), hosts)
        forwarders = [p for p in parents if p != plan.front_end] + [plan.front_end]
        _pool(self._forward, forwarders)

    def mac(self, host: str, down: bool) -> str:
        """The fixed MAC of a host's uplink (``down`` False) or of its end on its own bridge.

        Fixed so that every neighbour can be written down as a permanent entry: the kernel's
        neighbour table is one for all namespaces, and its 1,024-entry limit (gc_thresh3)
        would otherwise overflow at about 500 nodes ("neighbor table overflow"), dropping
        ARP for the rest. Permanent entries do not count against it.
        """
        plan = self.require_plan()
        number = 0 if host == plan.front_end else plan.node(host).number
        return ":".join(f"{b:02x}" for b in (2, 0x67, int(down), *number.to_bytes(3, "big")))

    def _bridges_skip_iptables(self) -> None:
        """Frames crossing our bridges need no iptables (br_netfilter, loaded by Docker on
        this host, would otherwise run them through the switch namespace's empty chains)."""
        knobs = [f"net.bridge.bridge-nf-call-{t}=0" for t in ("iptables", "ip6tables", "arptables")]
        if Path("/proc/sys/net/bridge").is_dir():
            argv = ["nsenter", f"--net={self.ns_path(SWITCH)}", "sysctl", "-qw", *knobs]
            subprocess.run(argv, capture_output=True)

    def _address(self, host: str) -> str:
        plan = self.require_plan()
        return plan.front_end_address if host == plan.front_end else plan.node(host).address

    def _host_lines(self, host: str) -> list[str]:
        """One namespace's links, address and routes, as ``ip -batch`` lines."""
        plan = self.require_plan()
        lines = ["link set lo up", "link set eth0 up"]
        lines.append(f"addr add {self._address(host)}/32 dev eth0")
        down = "eth0"
        if host != plan.front_end:
            parent = self._address(plan.node(host).parent)
            up_mac = self.mac(plan.node(host).parent, down=True)
            lines += [
                f"route add {parent}/32 dev eth0",
                f"route add default via {parent} dev eth0",
                f"neigh add {parent} lladdr {up_mac} dev eth0 nud permanent",
            ]
            down = "eth1"
        children = plan.children(host) if host != plan.front_end else self._level1()
        if children and down == "eth1":
            lines.append("link set eth1 up")
        for child in children:
            lines.append(f"route add {child.address}/32 dev {down}")
            mac = self.mac(child.name, down=False)
            lines.append(f"neigh add {child.address} lladdr {mac} dev {down} nud permanent")
            for below in self._subtree(child.name):
                lines.append(f"route add {below.address}/32 via {child.address} dev {down}")
        return lines

    def _level1(self) -> list[Node]:
        plan = self.require_plan()
        return [n for n in plan.nodes if n.parent == plan.front_end]

    def _subtree(self, host: str) -> list[Node]:
        plan = self.require_plan()
        found, todo = [], [host]
        while todo:
            kids = plan.children(todo.pop())
            found += kids
            todo += [k.name for k in kids]
        return found

    def _forward(self, host: str) -> None:
        """Parents route between their children and their own parent."""
        argv = ["nsenter", f"--net={self.ns_path(host)}", "sysctl", "-qw", "net.ipv4.ip_forward=1"]
        subprocess.run(argv, check=True, capture_output=True)

    # ------------------------------------------------------------------ daemons

    def start_zygote(self, timeout: float = 30) -> None:
        log = open(self.log("zygote"), "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.Popen(
            [sys.executable, "-m", zygote.MARK, "--name", self.name]
            + ["--socket", self.zygote_socket],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
            cwd="/",
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                zygote.request(self.zygote_socket, {"op": "list"}, timeout=5)
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"the zygote did not start: {self.log('zygote')}")
            time.sleep(0.1)

    def daemon_argv(self, host: str) -> list[str]:
        plan = self.require_plan()
        argv = ["-locale", plan.locale, "-key", self.key, "-debug", "1"]
        if plan.rack_size is not None:
            argv += ["-racksize", str(plan.rack_size)]
        if self.heartbeat is not None:
            argv += ["-heartbeat", str(self.heartbeat)]
        if host == plan.front_end:
            return [*argv, "-defaultMasterUDS", self.uds, "m"]
        # A launcher per slave would be a thousand more interpreters (4 MB and 55 ms of CPU
        # each) on one machine; these slaves fork their jobs themselves.
        return [*argv, "-binRoot", self.bin_root(host), "-launcher=false", "s"]

    def spawn(self, hosts: list[str]) -> dict[str, int]:
        """Fork ``gproc m|s`` for each host from the zygote (replacing nothing).

        Each namespace goes to the zygote as an open descriptor (see harness/zygote.py).
        """
        pids: dict[str, int] = {}
        for at in range(0, len(hosts), zygote.MAX_FDS):
            batch = hosts[at : at + zygote.MAX_FDS]
            procs = [
                {
                    "host": h,
                    "netns": self.ns_path(h),
                    "hostname": h,
                    "argv": self.daemon_argv(h),
                    "log": str(self.log(h)),
                }
                for h in batch
            ]
            fds = [os.open(self.ns_path(h), os.O_RDONLY) for h in batch]
            try:
                message = {"op": "spawn", "procs": procs}
                pids |= zygote.request(self.zygote_socket, message, fds=fds)["pids"]
            finally:
                for fd in fds:
                    os.close(fd)
        return pids

    def pids(self) -> dict[str, int]:
        """Host -> pid of its live daemon, as the zygote knows them."""
        for attempt in range(3):
            try:
                return zygote.request(self.zygote_socket, {"op": "list"}, timeout=60)["pids"]
            except (OSError, ValueError) as error:
                problem = error
                time.sleep(0.2 * (attempt + 1))
        raise HarnessError(f"the zygote of {self.name!r} does not answer: {problem}")

    def start_daemons(
        self, only: Iterable[str] | None = None, timeout: float = READY_TIMEOUT
    ) -> float:
        """Master first, then each level once the level above registered; returns seconds.

        Only hosts without a live daemon are started. A node whose parent died exits on its
        own (as on KANE) a moment later, so while a level is awaited its missing daemons are
        started again every few seconds rather than once.
        """
        plan = self.require_plan()
        wanted = set(only) if only is not None else {plan.front_end, *(n.name for n in plan.nodes)}
        t0 = time.monotonic()
        if plan.front_end in wanted and plan.front_end not in self.pids():
            self.spawn([plan.front_end])
            self.wait_master(timeout)
        for level in plan.levels():
            names = [n.name for n in level]
            self.wait_ready(names, timeout - (time.monotonic() - t0), restart=wanted)
        took = time.monotonic() - t0
        say(f"{self.name!r}: {len(plan.nodes)} nodes registered in {took:.1f}s")
        return took

    def wait_master(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(HarnessError):
                self.tree()
                return
            if time.monotonic() > deadline:
                tail = self.log(self.require_plan().front_end).read_text()[-800:]
                raise HarnessError(f"the master did not come up in {timeout:.0f}s:\n{tail}")
            time.sleep(0.2)

    def tree(self) -> dict[str, str]:
        """Node name -> state (up or lost), from the master (its Unix socket is a file)."""
        from gproc.client import fetch_tree, tree_rows
        from gproc.errors import GprocError

        try:
            rows = tree_rows(fetch_tree(self.uds))
        except (GprocError, OSError) as error:
            raise HarnessError(f"the master does not answer on {self.uds}: {error}") from None
        return {name: state for _, name, _, _, state in rows[1:]}

    def wait_ready(
        self,
        names: Iterable[str] | None = None,
        timeout: float = READY_TIMEOUT,
        restart: set[str] | None = None,
    ) -> None:
        """Block until every named node is up in the master's tree; else name the missing.

        Names in ``restart`` whose daemon is not running are (re)started now and every
        :data:`RESPAWN` seconds while they are missing.
        """
        plan = self.require_plan()
        names = list(names) if names is not None else [n.name for n in plan.nodes]
        deadline = time.monotonic() + max(timeout, 1)
        next_start = time.monotonic()
        while True:
            if restart and time.monotonic() >= next_start:
                alive = self.pids()
                todo = [n for n in names if n in restart and n not in alive]
                if todo:
                    self.spawn(todo)
                next_start = time.monotonic() + RESPAWN
            tree = self.tree()
            missing = [n for n in names if tree.get(n) != "up"]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{len(missing)} of {len(names)} nodes did not register within "
                    f"{timeout:.0f}s: {', '.join(missing[:40])} (logs in {self.dir / 'log'})"
                )
            time.sleep(0.3)

    def reload(self, timeout: float = READY_TIMEOUT) -> None:
        """New gproc code: a new zygote (it imports the working tree afresh), every daemon
        restarted. The namespaces and links stay."""
        for pid in zygote_pids(self.name):  # the zygote and every daemon it forked
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        self.start_zygote()
        self.start_daemons(timeout=timeout)

    # ------------------------------------------------------------------ using it

    def command(self, argv: list[str], host: str | None = None) -> list[str]:
        """``argv`` in ``host``'s network namespace with its hostname, gproc on PATH."""
        plan = self.require_plan()
        host = host or plan.front_end
        if host != plan.front_end:
            plan.node(host)
        return [
            "nsenter",
            f"--net={self.ns_path(host)}",
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            host,
            *argv,
        ]

    def env(self) -> dict[str, str]:
        return dict(os.environ, PATH=f"{self.dir / 'bin'}:{os.environ.get('PATH', '')}")

    def exec(self, argv: list[str], host: str | None = None, timeout: float = 300) -> Result:
        cmd = self.command(argv, host)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=self.env()
            )
        except subprocess.TimeoutExpired as error:
            raise HarnessError(f"{shlex.join(argv)} took over {timeout:.0f}s") from error
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def popen(self, argv: list[str], host: str | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, host), env=self.env(), **kw)

    def interactive(self, argv: list[str], host: str | None = None) -> int:
        return subprocess.call(self.command(argv, host), env=self.env())

    # ------------------------------------------------------------------ faults

    def fault(self, kind: str, host: str) -> None:
        """kill: SIGKILL the daemon; stop: SIGSTOP it; cut: its links down; heal: undo."""
        plan = self.require_plan()
        if host != plan.front_end:
            plan.node(host)
        if kind not in FAULTS:
            raise PlanError(f"unknown fault {kind!r}: use one of {', '.join(FAULTS)}")
        if kind == "heal":
            self.heal([host])
            return
        if kind == "cut":
            self._links(host, "down")
            return
        pid = self.pids().get(host)
        if pid is None:
            raise HarnessError(f"no daemon runs on {host}")
        os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)

    def _links(self, host: str, state: str) -> None:
        ends = [f"u-{host}"] if host != self.require_plan().front_end else []
        if host in self.parents():
            ends.append(f"d-{host}")
        _ip(["-n", self.ns(SWITCH)], [f"link set {end} {state}" for end in ends])

    def heal(self, hosts: list[str] | None = None, timeout: float = READY_TIMEOUT) -> None:
        """Links up, stopped daemons continued, dead ones (and their subtrees) started again."""
        plan = self.require_plan()
        every = [plan.front_end, *(n.name for n in plan.nodes)]
        hosts = hosts or every
        _ip(["-n", self.ns(SWITCH)], [f"link set {e} up" for h in hosts for e in self._ends(h)])
        for host, pid in self.pids().items():
            if host in hosts:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.start_daemons(timeout=timeout)  # everything not running: a dead parent's children

    def _ends(self, host: str) -> list[str]:
        ends = [] if host == self.require_plan().front_end else [f"u-{host}"]
        return ends + ([f"d-{host}"] if host in self.parents() else [])

    # ------------------------------------------------------------------ memory

    def memory(self) -> dict[str, tuple[int, int]]:
        """Host -> (USS, PSS) in bytes of its daemon, from /proc/PID/smaps_rollup."""
        found = {}
        for host, pid in self.pids().items():
            with contextlib.suppress(OSError):
                found[host] = smaps(pid)
        return found

    # ------------------------------------------------------------------ down

    def down(self, quiet: bool = False) -> int:
        """Remove everything of this cluster, also what a crashed run left (module doc)."""
        prefix = f"{PREFIX}-{self.name}-"
        names = sorted(p.name for p in NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.is_dir() else []
        if names and not quiet:
            say(f"removing {len(names)} namespaces of {self.name!r}")
        for pid in zygote_pids(self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        inodes = set()
        for n in names:
            with contextlib.suppress(OSError):
                inodes.add(os.stat(NETNS_DIR / n).st_ino)
        for _ in range(50):
            inside = pids_in(inodes)
            if not inside:
                break
            for pid in inside:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if names:
            _ip([], (f"netns del {n}" for n in names), check=False)
        for mount in mounts_with(prefix.rstrip("-")):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        for n in names:  # what `ip netns del` could not remove (a mount still busy)
            with contextlib.suppress(OSError):
                (NETNS_DIR / n).unlink()
        for where in (self.dir, *data_dirs(self.name)):
            shutil.rmtree(where, ignore_errors=True)
        return len(names)

    def leftovers(self) -> list[str]:
        """What ``down`` must have removed: namespaces, processes, mounts, directories."""
        prefix = f"{PREFIX}-{self.name}-"
        spaces = NETNS_DIR.glob(f"{prefix}*") if NETNS_DIR.is_dir() else []
        left = [f"netns {p.name}" for p in spaces]
        left += [f"zygote pid {pid}" for pid in zygote_pids(self.name)]
        left += [f"mount {m}" for m in mounts_with(prefix.rstrip("-"))]
        left += [f"link {link}" for link in host_links(f"{PREFIX}-")]
        left += [f"directory {d}" for d in (self.dir, *data_dirs(self.name)) if d.exists()]
        return left


def smaps(pid: int) -> tuple[int, int]:
    """(USS, PSS) in bytes: private pages, and pages shared split by their sharers."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def zygote_pids(name: str) -> list[int]:
    """Zygotes of this cluster, found by their command line (a pid file could lie)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if zygote.MARK.encode() in argv and name.encode() in argv:
            i = argv.index(b"--name")
            if argv[i + 1] == name.encode():
                found.append(int(entry.name))
    return found


def pids_in(inodes: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes``."""
    found = []
    if not inodes:
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns" / "net").st_ino in inodes:
                    found.append(int(entry.name))
    return found


def mounts_with(text: str) -> list[str]:
    """Mount points (of this mount namespace) whose path contains ``text``."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if text in point:
            found.append(point)
    return sorted(found, key=len, reverse=True)


def host_links(prefix: str) -> list[str]:
    """Links of the host's own namespace named with ``prefix`` (we make none; a check)."""
    return [p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(prefix)]
