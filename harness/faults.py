"""Fault injection: what can go wrong with a node, and the heal that undoes each.

Faults act on the container of a node (or of the front-end, ``cesspool``), as an operator
would meet them: ``kill`` (the node dies), ``stop`` (orderly shutdown), ``pause`` (hung:
processes frozen, sockets open), ``disconnect`` (cable pulled), ``sshd-stop`` (the node runs
but cannot be logged into: what ``gproc-deploy`` meets as UNREACHABLE). ``resume``,
``reconnect`` and ``sshd-start`` undo three of them; :func:`heal` undoes everything at once,
including restarting the daemons a dead rack master took with it (a slave exits when its
parent goes away).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterable

import docker.errors

from .cluster import READY_TIMEOUT, Cluster, HarnessError, run_dir
from .images import say
from .plan import make_plan

FAULTS = ("kill", "stop", "pause", "resume", "disconnect", "reconnect", "sshd-stop", "sshd-start")


def _address(cluster: Cluster, host: str) -> str:
    plan = cluster.require_plan()
    return plan.front_end_address if host == plan.front_end else plan.node(host).address


def kill(cluster: Cluster, host: str) -> None:
    """SIGKILL the whole container: the node vanishes without a goodbye."""
    cluster.container(host).kill()


def stop(cluster: Cluster, host: str) -> None:
    """SIGTERM, then SIGKILL after 2 s: an orderly shutdown."""
    cluster.container(host).stop(timeout=2)


def pause(cluster: Cluster, host: str) -> None:
    """Freeze every process of the node (cgroup freezer); its sockets stay open."""
    cluster.container(host).pause()


def resume(cluster: Cluster, host: str) -> None:
    box = cluster.container(host)
    if box.status == "paused":
        box.unpause()


def disconnect(cluster: Cluster, host: str) -> None:
    """Take the node off the cluster network; its processes keep running."""
    cluster.client.networks.get(cluster.network_name).disconnect(cluster.container(host))


def reconnect(cluster: Cluster, host: str) -> None:
    """Put the node back on the network at its own address (the locale's)."""
    box = cluster.container(host)
    if cluster.network_name in box.attrs["NetworkSettings"]["Networks"]:
        return
    net = cluster.client.networks.get(cluster.network_name)
    net.connect(box, ipv4_address=_address(cluster, host))


ACTIONS: dict[str, Callable[[Cluster, str], None]] = {
    "kill": kill,
    "stop": stop,
    "pause": pause,
    "resume": resume,
    "disconnect": disconnect,
    "reconnect": reconnect,
    "sshd-stop": lambda cluster, host: cluster.stop_sshd(host),
    "sshd-start": lambda cluster, host: cluster.start_sshd(host),
}


def inject(cluster: Cluster, fault: str, host: str) -> None:
    """Apply ``fault`` to ``host`` (a node name or the front-end's)."""
    if fault not in ACTIONS:
        raise HarnessError(f"unknown fault {fault!r}: use one of {', '.join(FAULTS)}")
    plan = cluster.require_plan()
    if host != plan.front_end:
        plan.node(host)  # a clear error for a name outside the cluster
    elif fault.startswith("sshd"):
        raise HarnessError(f"{fault}: {host} runs no sshd (gproc-deploy runs there)")
    try:
        ACTIONS[fault](cluster, host)
    except docker.errors.APIError as error:
        raise HarnessError(f"{fault} {host}: {error.explanation or error}") from None


def _restore_container(cluster: Cluster, host: str) -> bool:
    """Bring the container back running and connected; True if it had to be started."""
    box = cluster.container(host)
    started = False
    if box.status == "paused":
        box.unpause()
    elif box.status != "running":
        box.start()
        started = True
    box.reload()
    reconnect(cluster, host)
    return started


def heal(
    cluster: Cluster,
    hosts: Iterable[str] | None = None,
    timeout: float = READY_TIMEOUT,
    daemons: bool | None = None,
) -> None:
    """Undo every fault (on ``hosts``, default all) and wait until all 80 daemons are up.

    Every node's sshd is started again where it does not answer. A daemon is restarted when
    it is not running or the master does not show its node up; the children of a restarted
    node are restarted too (they exit with their parent, or would hang on to a dead
    connection), and a restarted master means every daemon. ``daemons`` False (default: the
    cluster was brought up with ``--no-daemons``) heals containers and sshd only: the gproc
    daemons there are gproc-deploy's business.
    """
    plan = cluster.require_plan()
    names = [plan.front_end, *(n.name for n in plan.nodes)]
    todo = list(hosts) if hosts is not None else names
    cluster.pool(lambda h: _restore_container(cluster, h), todo)
    cluster.pool(cluster.start_sshd, cluster.sshd_down())
    cluster.wait_sshd(timeout)
    if daemons is False or (daemons is None and not cluster.daemons):
        return
    dead = {
        h for h, ok in zip(names, cluster.pool(cluster.daemon_alive, names), strict=True) if not ok
    }
    if plan.front_end in dead:
        restart = set(names)
    else:
        tree = cluster.tree()
        restart = dead | {n.name for n in plan.nodes if tree.get(n.name) != "up"}
        restart |= {c.name for r in list(restart) for c in plan.children(r)}
    if restart:
        say(f"restarting the daemons of {len(restart)} hosts")
        cluster.start_daemons(only=restart, timeout=timeout)
    cluster.wait_ready(timeout=timeout)


def add_intruder(cluster: Cluster, number: int = 100) -> str:
    """Start node ``kn<number>`` with a cluster key of its own; returns its name.

    The default, kn100, is a rack master on kane, so it dials the master itself: the
    strongest place to try to join from. It must be refused at the handshake.
    """
    plan = cluster.require_plan()
    host = make_plan(plan.locale, number, plan.subnet).nodes[-1]
    key = run_dir(cluster.name) / "intruder.key"
    if not key.exists():
        cmd = [sys.executable, "-m", "gproc", "-key", str(key), "k"]
        subprocess.run(cmd, check=True, capture_output=True)
    image = cluster.container(plan.nodes[0].name).image.id
    cluster.create_container(image, host.name, host.address, "intruder", key=key)
    cluster.start_daemon(host.name)
    return host.name


def remove_intruder(cluster: Cluster, host: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        cluster.container(host).remove(force=True)
