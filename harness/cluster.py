"""An emulated KANE: a front-end container and node containers running real gproc daemons.

A cluster is found again by its name alone: every container and its network carry the labels
``gproc.harness.cluster`` (the name) and ``gproc.harness.run`` (one id per ``up``), and the
network's labels also hold the locale and node count, so ``status``, ``exec``, ``fault`` and
``down`` need no state file and can clean up after a crashed run.

Daemons are started with ``docker exec`` in containers that just sleep, so a daemon can be
restarted (a rack master's children exit when it goes away) without recreating anything.
Every node also runs sshd (see ``harness/ssh.py``), and ``up(daemons=False)`` (``up
--no-daemons``) stops there: containers and sshd, no gproc, which is where ``gproc-deploy``
starts from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import docker.models.networks
from docker.models.containers import Container

from gproc.deploy.artifact import build_zipapp

from . import ssh
from .images import Images, build_images, say
from .plan import KANE_SUBNET, Node, Plan, PlanError, make_plan

LABEL = "gproc.harness"
CLUSTER, RUN, ROLE = f"{LABEL}.cluster", f"{LABEL}.run", f"{LABEL}.role"
LOCALE, COUNT, SUBNET = f"{LABEL}.locale", f"{LABEL}.nodes", f"{LABEL}.subnet"
DAEMONS = f"{LABEL}.daemons"  # "harness": up starts gproc; "none": up --no-daemons
KEY = "/etc/gproc/cluster.key"
PIDFILE, LOGFILE = "/run/gproc.pid", "/var/log/gproc.log"
DEFAULT_NAME = "gproc"
POOL = int(os.environ.get("GPROC_HARNESS_POOL", "16"))
READY_TIMEOUT = float(os.environ.get("GPROC_HARNESS_TIMEOUT", "120"))
NODE_CACHE_MB = 128  # -cacheMB of the node daemons (see daemon_argv)
# The pid file names a gproc daemon only if that pid's command line says so: a pid can be
# reused, and killing the container's `sleep` would stop the whole node.
_IS_DAEMON = f"p=$(cat {PIDFILE} 2>/dev/null) && grep -q gproc /proc/$p/cmdline 2>/dev/null"
_STOP_DAEMON = (
    f"if {_IS_DAEMON}; then kill $p; i=0; "
    "while kill -0 $p 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; "
    "kill -9 $p 2>/dev/null; fi"
)
# The master's tree as JSON {node: state}, from the front-end (see Cluster.tree).
_TREE_JSON = (
    "import json, sys; sys.path.insert(0, '/opt/gproc/gproc.pyz'); "
    "from gproc.client import fetch_tree, tree_rows; "
    "print(json.dumps({r[1]: r[4] for r in tree_rows(fetch_tree('/tmp/g'))[1:]}))"
)


class HarnessError(RuntimeError):
    """The cluster cannot do what was asked; the message says what is wrong and what to do."""


@dataclass
class Result:
    """What a command run in a container gave back."""

    status: int
    out: str
    err: str

    def lines(self) -> list[str]:
        return self.out.splitlines()


def docker_client() -> docker.DockerClient:
    """A client with a connection pool as large as our thread pool, or a clear error."""
    try:
        client = docker.from_env(max_pool_size=POOL + 4, timeout=120)
        client.ping()
    except docker.errors.DockerException as error:
        raise HarnessError(f"no Docker engine reachable: {error}") from None
    return client


def run_dir(name: str) -> Path:
    """Host directory holding the cluster's zipapp and key (mounted into every container)."""
    base = Path(os.environ.get("GPROC_HARNESS_RUNDIR", tempfile.gettempdir()))
    return base / f"gproc-harness-{name}"


class Cluster:
    """One named cluster; ``up`` creates it, any other method works on what exists."""

    def __init__(self, name: str = DEFAULT_NAME, client: docker.DockerClient | None = None):
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name):
            raise PlanError(f"bad cluster name {name!r}: letters, digits, '_', '.', '-'")
        self.name = name
        self.client = client or docker_client()
        self.plan: Plan | None = None
        self.run_id = ""
        self.daemons = True  # False: the harness starts no gproc daemon (up --no-daemons)

    # ------------------------------------------------------------------ names and lookup

    def container_name(self, host: str) -> str:
        return f"{self.name}-{host}"

    @property
    def network_name(self) -> str:
        return f"{self.name}-net"

    def labels(self, role: str) -> dict[str, str]:
        """Every object gets name, run and role; the front-end also what ``attach`` needs."""
        labels = {CLUSTER: self.name, RUN: self.run_id, ROLE: role}
        if role == "frontend":
            plan = self.require_plan()
            labels |= {LOCALE: plan.locale, COUNT: str(len(plan.nodes)), SUBNET: plan.subnet}
            labels[DAEMONS] = "harness" if self.daemons else "none"
        return labels

    def containers(self) -> list[Container]:
        """Every container of this cluster, whatever its run or state."""
        return self.client.containers.list(all=True, filters={"label": f"{CLUSTER}={self.name}"})

    def container(self, host: str) -> Container:
        try:
            return self.client.containers.get(self.container_name(host))
        except docker.errors.NotFound:
            raise HarnessError(f"no container for {host} in cluster {self.name!r}") from None

    def attach(self) -> Cluster:
        """Load the plan of a running cluster from its front-end container's labels."""
        found = self.client.containers.list(
            all=True, filters={"label": [f"{CLUSTER}={self.name}", f"{ROLE}=frontend"]}
        )
        if not found:
            raise HarnessError(f"no cluster {self.name!r}: start it with python -m harness up")
        labels = found[0].labels
        self.plan = make_plan(labels[LOCALE], int(labels[COUNT]), labels[SUBNET])
        self.run_id = labels[RUN]
        self.daemons = labels.get(DAEMONS, "harness") != "none"
        return self

    def require_plan(self) -> Plan:
        if self.plan is None:
            self.attach()
        assert self.plan is not None
        return self.plan

    # ------------------------------------------------------------------ up and down

    def up(
        self,
        nodes: int = 80,
        locale: str = "kane",
        subnet: str = KANE_SUBNET,
        timeout: float = READY_TIMEOUT,
        daemons: bool = True,
    ) -> Cluster:
        """Replace any cluster of this name with a fresh one: every sshd answering and, unless
        ``daemons`` is False, every gproc daemon registered."""
        self.plan = make_plan(locale, nodes, subnet)
        self.down(quiet=True)
        self.run_id = uuid.uuid4().hex[:12]
        self.daemons = daemons
        try:
            images = build_images(self.client)
            self._prepare_run_dir()
            self._create_network()
            self._create_containers(images)
            self.wait_sshd(timeout)
            if daemons:
                self.start_daemons(timeout=timeout)
        except BaseException:
            say(f"up of {self.name!r} failed; removing what was created")
            self.down(quiet=True)
            raise
        return self

    def _prepare_run_dir(self) -> None:
        """Build the zipapp of the working tree and a fresh cluster key (mode 0600)."""
        plan = self.require_plan()
        where = run_dir(self.name)
        shutil.rmtree(where, ignore_errors=True)
        (where / "opt").mkdir(parents=True)
        self.build_code()
        key = where / "cluster.key"
        proc = subprocess.run(
            [sys.executable, "-m", "gproc", "-key", str(key), "k"], capture_output=True, text=True
        )
        if proc.returncode != 0 or key.stat().st_mode & 0o077:
            raise HarnessError(f"cannot create the cluster key {key}: {proc.stderr.strip()}")
        if plan.translated:
            (where / "opt" / "topology.json").write_text(plan.topology())
        try:
            ssh.make_keys(where / "ssh", plan)
        except ssh.SshKeyError as error:
            raise HarnessError(str(error)) from None

    def switch_locale(self, locale: str, timeout: float = READY_TIMEOUT) -> None:
        """Restart every daemon with another locale (kane <-> kf): same containers, addresses.

        Only the daemons differ between a kane and a kf cluster, so this is the cheap way to
        test both on 80 nodes. The network's labels keep the locale ``up`` was given.
        """
        plan = self.require_plan()
        self.plan = make_plan(locale, len(plan.nodes), plan.subnet)
        if self.plan.translated:
            (run_dir(self.name) / "opt" / "topology.json").write_text(self.plan.topology())
        self.start_daemons(timeout=timeout)

    def build_code(self) -> str:
        """(Re)build the working tree's zipapp into the directory every container mounts.

        The zipapp is also unpacked (``/opt/gproc/site``): the front-end's ``gproc-deploy``
        runs from there, as from a pip install, because the deployer builds its artifact
        from gproc's source files and cannot read them inside a zip.
        """
        pyz, sha = build_zipapp(run_dir(self.name) / "opt" / "gproc.pyz")
        site = run_dir(self.name) / "opt" / "site"
        shutil.rmtree(site, ignore_errors=True)
        with zipfile.ZipFile(pyz) as zf:
            zf.extractall(site)
        say(f"gproc zipapp {sha[:12]} of the working tree")
        return sha

    def reload(self, timeout: float = READY_TIMEOUT) -> None:
        """New gproc code without new containers: rebuild the zipapp, restart every daemon."""
        self.require_plan()
        self.build_code()
        self.start_daemons(timeout=timeout)

    def _create_network(self) -> None:
        plan = self.require_plan()
        pool = docker.types.IPAMPool(subnet=plan.subnet, gateway=plan.gateway)
        labels = self.labels("network")
        if self._adopt_network():
            return
        try:
            self.client.networks.create(
                self.network_name,
                driver="bridge",
                ipam=docker.types.IPAMConfig(pool_configs=[pool]),
                labels=labels,
            )
        except docker.errors.APIError as error:
            hint = ""
            if "overlap" in str(error):
                hint = (
                    f"; another network uses {plan.subnet} (docker network ls; "
                    "python -m harness down --name OTHER, or give --subnet)"
                )
            raise HarnessError(
                f"cannot create network {self.network_name}: {error}{hint}"
            ) from None

    def _adopt_network(self) -> bool:
        """Reuse our own network when the engine refused to remove it (see ``down``)."""
        try:
            net = self.client.networks.get(self.network_name)
        except docker.errors.NotFound:
            return False
        subnet = net.attrs["IPAM"]["Config"][0]["Subnet"]
        if net.attrs["Labels"].get(CLUSTER) != self.name or subnet != self.require_plan().subnet:
            raise HarnessError(f"network {self.network_name} exists and is not ours to reuse")
        say(f"reusing network {self.network_name}: the engine could not remove it (module doc)")
        return True

    def mounts(self, role: str, key: Path | None = None) -> dict[str, dict[str, str]]:
        """The code directory (zipapp, topology file) and the key, read-only; on nodes, the
        sshd host key and authorized_keys too.

        The directory, not the zipapp file, is mounted: a rebuilt zipapp is a new file, which
        a file mount would not show, and ``reload`` relies on seeing it.
        """
        where = run_dir(self.name)
        mounts = {
            str(where / "opt"): {"bind": "/opt/gproc", "mode": "ro"},
            str(key or where / "cluster.key"): {"bind": KEY, "mode": "ro"},
        }
        if role != "frontend":
            mounts[str(where / "ssh" / "nodes")] = {"bind": ssh.SSH_DIR, "mode": "ro"}
        return mounts

    def create_container(
        self, image: str, host: str, address: str, role: str, key: Path | None = None
    ) -> Container:
        """One container at a fixed address, with what private mounts need (module doc)."""
        endpoint = self.client.api.create_endpoint_config(ipv4_address=address)
        return self.client.containers.run(
            image,
            name=self.container_name(host),
            hostname=host,
            detach=True,
            init=True,
            cap_add=["SYS_ADMIN"],
            security_opt=["apparmor=unconfined"],
            labels=self.labels(role),
            network=self.network_name,
            networking_config={self.network_name: endpoint},
            volumes=self.mounts(role, key),
            command=None if role == "frontend" else ssh.NODE_COMMAND,
            # tmpfs: jobs' files skip the slow fuse-overlayfs, and the pid file goes with a
            # restart (a stale pid could name another process of the restarted container).
            tmpfs={"/tmp": "rw,exec,nosuid,nodev,size=512m", "/run": "rw,size=16m"},
            log_config={"type": "none"},
        )

    def _create_containers(self, images: Images) -> None:
        plan = self.require_plan()
        say(f"starting {plan.front_end} and {len(plan.nodes)} nodes ({POOL} at a time)")
        front = self.create_container(
            images.frontend, plan.front_end, plan.front_end_address, "frontend"
        )
        front.put_archive("/", ssh.frontend_archive(run_dir(self.name) / "ssh"))
        self.pool(
            lambda n: self.create_container(images.node, n.name, n.address, "node"), plan.nodes
        )

    def down(self, quiet: bool = False) -> int:
        """Remove every container and network of this cluster (healing paused ones first)."""
        found = self.containers()
        if found and not quiet:
            say(f"removing {len(found)} containers of {self.name!r}")
        self.pool(_stop, found)
        nets = self.client.networks.list(filters={"label": f"{CLUSTER}={self.name}"})
        for net in nets:  # one at a time: see _remove_network
            for box in found:
                with contextlib.suppress(docker.errors.APIError):
                    net.disconnect(box, force=True)
        self.pool(_remove, found)
        for net in nets:
            _remove_network(net)
        shutil.rmtree(run_dir(self.name), ignore_errors=True)
        return len(found)

    # ------------------------------------------------------------------ sshd

    def sshd_down(self, names: Iterable[str] | None = None) -> list[str]:
        """The nodes whose sshd does not greet the front-end (where gproc-deploy dials from)."""
        plan = self.require_plan()
        names = set(names) if names is not None else {n.name for n in plan.nodes}
        pairs = [(n.name, n.address) for n in plan.nodes if n.name in names]
        res = self.exec(ssh.probe_argv(pairs), timeout=60)
        if res.status != 0:
            raise HarnessError(f"cannot probe sshd from {plan.front_end}: {res.err.strip()}")
        return res.lines()

    def wait_sshd(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until every node's sshd answers; else name the nodes where it does not."""
        deadline = time.monotonic() + timeout
        while down := self.sshd_down():
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"sshd did not answer within {timeout:.0f}s on {len(down)} nodes: "
                    f"{', '.join(down)} (its log: {ssh.SSHD_LOG} there)"
                )
            time.sleep(0.5)

    def start_sshd(self, host: str) -> None:
        """Start sshd in ``host`` unless it runs (the container command did it at start)."""
        code, out = self.container(host).exec_run(["sh", "-c", ssh.START_SSHD])
        if code != 0:
            raise HarnessError(f"sshd did not start on {host}: {out.decode().strip()}")

    def stop_sshd(self, host: str) -> None:
        """Stop the sshd listener of ``host``; sessions already open go on, as on a real host."""
        self.container(host).exec_run(["sh", "-c", ssh.STOP_SSHD])

    # ------------------------------------------------------------------ daemons

    def daemon_argv(self, mode: str) -> list[str]:
        plan = self.require_plan()
        argv = ["gproc", "-locale", plan.daemon_locale(), "-key", KEY, "-debug", "1", mode]
        if mode == "m":  # a shared tree, as on KANE: every user of the front-end may use it
            argv[-1:-1] = ["-allow", "all"]
        else:  # the node cache lives in the container's /tmp, in RAM: 80 nodes with the
            # default 512 MB each could hold more than the whole host has
            argv[-1:-1] = ["-cacheMB", str(NODE_CACHE_MB)]
        return argv

    def start_daemon(self, host: str, mode: str = "s") -> None:
        """Start ``gproc m|s`` detached in ``host``, replacing a daemon already running."""
        argv = " ".join(shlex.quote(a) for a in self.daemon_argv(mode))
        script = f"{_STOP_DAEMON}; echo $$ > {PIDFILE}; exec {argv} >>{LOGFILE} 2>&1"
        self.container(host).exec_run(["sh", "-c", script], detach=True)

    def stop_daemons(self) -> None:
        """Stop every gproc daemon the harness started (the containers and sshd stay)."""
        plan = self.require_plan()
        hosts = [plan.front_end, *(n.name for n in plan.nodes)]
        self.pool(lambda h: self.container(h).exec_run(["sh", "-c", _STOP_DAEMON]), hosts)

    def daemon_alive(self, host: str) -> bool:
        try:
            box = self.container(host)
            if box.status != "running":
                return False
            code, _ = box.exec_run(["sh", "-c", _IS_DAEMON])
        except (docker.errors.APIError, HarnessError):
            return False
        return code == 0

    def start_daemons(
        self, only: Iterable[str] | None = None, timeout: float = READY_TIMEOUT
    ) -> None:
        """Master first if asked, then each level of nodes once the level above registered."""
        plan = self.require_plan()
        wanted = set(only) if only is not None else {plan.front_end, *(n.name for n in plan.nodes)}
        t0 = time.monotonic()
        if plan.front_end in wanted:
            self.start_daemon(plan.front_end, "m")
            self.wait_master(timeout)
        for level in plan.levels():
            todo = [n for n in level if n.name in wanted]
            self.pool(lambda n: self.start_daemon(n.name), todo)
            self.wait_ready([n.name for n in level], timeout - (time.monotonic() - t0))
        say(f"{self.name!r}: {len(plan.nodes)} nodes registered in {time.monotonic() - t0:.1f}s")

    def wait_master(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.exec(["gproc", "i"], timeout=20).status != 0:
            if time.monotonic() > deadline:
                log = self.exec(["tail", "-5", LOGFILE]).out
                raise HarnessError(f"the master did not come up in {timeout:.0f}s:\n{log}")
            time.sleep(0.3)

    def tree(self) -> dict[str, str]:
        """Node name -> state (up or lost) as the master's ``gproc i`` knows it.

        Asked through gproc's own client (the zipapp is importable), not by parsing the text
        of ``gproc i``, which folds the names of a tree of more than 100 nodes.
        """
        res = self.exec(["python3", "-c", _TREE_JSON], timeout=30)
        if res.status != 0:
            err = res.err.strip().splitlines()[-1:] or [""]
            raise HarnessError(f"gproc i failed (exit {res.status}): {err[0]}")
        return json.loads(res.out)

    def wait_ready(
        self, names: Iterable[str] | None = None, timeout: float = READY_TIMEOUT
    ) -> None:
        """Block until every named node shows up in ``gproc i``; else name the missing."""
        plan = self.require_plan()
        names = list(names) if names is not None else [n.name for n in plan.nodes]
        deadline = time.monotonic() + max(timeout, 1)
        while True:
            tree = self.tree()
            missing = [n for n in names if tree.get(n) != "up"]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{len(missing)} of {len(names)} nodes did not register within "
                    f"{timeout:.0f}s: {', '.join(missing)}"
                )
            time.sleep(0.5)

    # ------------------------------------------------------------------ running things

    def exec(
        self,
        argv: list[str],
        host: str | None = None,
        timeout: float = 300,
        workdir: str = "/",
        user: str | None = None,
    ) -> Result:
        """Run ``argv`` in a container (the front-end by default), as root or ``user``."""
        host = host or self.require_plan().front_end
        as_user = ["-u", user] if user else []
        cmd = ["docker", "exec", "-w", workdir, *as_user, self.container_name(host), *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise HarnessError(f"{shlex.join(argv)} on {host} took over {timeout:.0f}s") from error
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def on_nodes(self, argv: list[str], names: Iterable[str] | None = None) -> dict[str, Result]:
        """Run ``argv`` on each node directly (not through gproc): the ground truth."""
        plan = self.require_plan()
        names = list(names) if names is not None else [n.name for n in plan.nodes]
        results = self.pool(lambda n: self.exec(argv, host=n, timeout=60), names)
        return dict(zip(names, results, strict=True))

    def pool(self, fn: Callable, items: Iterable) -> list:
        """Apply ``fn`` in a bounded pool, re-raising the first failure."""
        with ThreadPoolExecutor(max_workers=POOL) as ex:
            return list(ex.map(fn, items))

    def node(self, name: str) -> Node:
        return self.require_plan().node(name)


def _stop(box: Container) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        if box.status == "paused":
            box.unpause()
        if box.status in ("running", "paused"):
            box.kill()


def _remove(box: Container) -> None:
    """Remove one container; a paused one is resumed first (paused ones resist rm -f)."""
    with contextlib.suppress(docker.errors.NotFound):
        if box.status == "paused":
            box.unpause()
        box.remove(force=True)


def _remove_network(net: docker.models.networks.Network, patience: float = 10) -> None:
    """Remove a network; the engine frees the endpoints of removed containers a bit later.

    Docker 20.10 was seen (here, after 81 containers were force-removed in parallel) to keep
    a network's endpoint count above zero with no endpoint left: "has active endpoints"
    forever, until dockerd restarts. ``down`` now detaches containers one by one before
    removing them; a network still stuck is left in place, reported, and reused by the
    next ``up`` of the same cluster (``_adopt_network``), so the subnet stays usable.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            net.remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as error:
            if "active endpoints" not in str(error):
                raise HarnessError(f"cannot remove network {net.name}: {error}") from None
            if time.monotonic() > deadline:
                say(f"the engine keeps network {net.name} (stale endpoint count); left in place")
                return
            time.sleep(0.5)
