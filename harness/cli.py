"""``python -m harness``: bring an emulated KANE up, use it, break it, take it down.

Two backends: ``docker`` (a container per node, the default) and ``netns`` (a network
namespace per node, for 1,000 and more; ``harness/netns.py``). ``up --backend`` picks one;
the other commands use the netns cluster of that name when one exists, else Docker.

Every command finds the cluster by ``--name`` alone (labels on its containers and network),
so a shell, a test run and a benchmark can share one cluster or clean up after each other.
Errors are one line on stderr and an exit status: 2 for bad input, 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import docker.errors

from .cluster import DEFAULT_NAME, READY_TIMEOUT, Cluster, HarnessError
from .faults import FAULTS, heal, inject
from .host import ToolError
from .images import ImageError, build_images
from .netns import FAULTS as NETNS_FAULTS
from .netns import READY_TIMEOUT as NETNS_TIMEOUT
from .netns import NetnsCluster
from .plan import KANE_SUBNET, LOCALES, PlanError, make_plan

BACKENDS = ("docker", "netns")

EPILOG = """\
examples:
  python -m harness up                        80 nodes on kane: kn1..kn80 at 10.1.30.N,
                                              the front-end cesspool at 10.1.254.254
  python -m harness up --no-daemons           containers and sshd only, for gproc-deploy:
  python -m harness exec -- gproc-deploy up 1 80 --locale kane
  python -m harness exec -- gproc e ./. /bin/hostname
  python -m harness exec -- gproc i           the tree as the master sees it
  python -m harness fault kill kn20           a rack master dies (its rack is lost)
  python -m harness fault sshd-stop kn5       kn5 runs but cannot be logged into
  python -m harness heal                      restart what died, wait for all 80
  python -m harness down                      remove every container and the network
  python -m harness up --nodes 1000 --backend netns
                                              1,000 real slaves in network namespaces
  python -m harness up --nodes 40 --backend netns --locale kane3 --racksize 5
                                              three levels: rows, racks, nodes
  python -m harness exec --node kn7 -- hostname
  python -m harness fault cut kn20            (netns faults: kill, stop, cut, heal)

The kane and kf locales compute 10.1.x.y addresses, so the network is 10.1.0.0/16 by
default. Where that is taken, --subnet (or GPROC_HARNESS_SUBNET) moves the cluster to another
/16: addresses keep their last two octets and the daemons then run with an equivalent
static topology file (/opt/gproc/topology.json) instead of the built-in locale.

environment: GPROC_HARNESS_NAME (default cluster name), GPROC_HARNESS_SUBNET,
GPROC_HARNESS_POOL (containers started at a time, 16), GPROC_HARNESS_TIMEOUT (seconds to
wait for registration, 120), GPROC_HARNESS_BASE (base image to build on),
GPROC_HARNESS_CACHE (wheelhouse cache), GPROC_HARNESS_MIRROR (Debian mirror for debootstrap).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness",
        description="An emulated KANE cluster in Docker, running the gproc of this working tree.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--name",
        default=os.environ.get("GPROC_HARNESS_NAME", DEFAULT_NAME),
        help="cluster name: prefix of container names, value of their labels (%(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("GPROC_HARNESS_BACKEND"),
        help="docker or netns (default: netns when a netns cluster of this name exists)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser(
        "up", help="replace the cluster of this name with a fresh one, wait until ready"
    )
    up.add_argument("--nodes", type=int, default=80, help="node containers kn1..knN (default 80)")
    up.add_argument("--locale", choices=LOCALES, default="kane", help="topology (default kane)")
    up.add_argument(
        "--backend",
        choices=BACKENDS,
        default=argparse.SUPPRESS,
        help="docker: a container per node (default); netns: a network namespace per node",
    )
    up.add_argument("--racksize", type=int, help="netns: nodes per rack (-racksize of the daemons)")
    up.add_argument(
        "--subnet",
        default=os.environ.get("GPROC_HARNESS_SUBNET", KANE_SUBNET),
        help="network for the cluster, a /16 or larger (default %(default)s)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        help=f"seconds to wait for the daemons (docker {READY_TIMEOUT:g}, netns {NETNS_TIMEOUT:g})",
    )
    up.add_argument(
        "--no-daemons",
        action="store_true",
        help="start containers and sshd, no gproc: gproc-deploy starts the tree",
    )
    sub.add_parser(
        "status", help="every host's container, sshd and tree state; exit 1 unless all up"
    )
    ex = sub.add_parser("exec", help="run a command on the front-end (or --node), e.g. gproc e")
    ex.add_argument("--node", help="run on this node instead of the front-end")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command")
    sub.add_parser("down", help="remove every container and network of the cluster")
    fault = sub.add_parser("fault", help="inject a fault into a node (or the front-end)")
    kinds = tuple(dict.fromkeys(FAULTS + NETNS_FAULTS))
    fault.add_argument("fault", choices=kinds, help=", ".join(kinds))
    fault.add_argument("node", help="node name (kn20) or the front-end's (cesspool)")
    hl = sub.add_parser(
        "heal", help="undo every fault, restart sshd and (unless --no-daemons) lost daemons"
    )
    hl.add_argument("nodes", nargs="*", help="only these hosts' containers (default all)")
    sub.add_parser("reload", help="rebuild the gproc zipapp from the working tree, restart daemons")
    sub.add_parser("images", help="build (or find) the node and front-end images, print their tags")
    return p


def _tree_or_none(cluster: Cluster) -> dict[str, str] | None:
    """The master's view, or None when no master answers (e.g. ``up --no-daemons``)."""
    try:
        return cluster.tree()
    except HarnessError:
        return None


def do_status(cluster: Cluster) -> int:
    """One row per host; exit 0 when every sshd answers and (harness daemons) all are up."""
    plan = cluster.require_plan()
    boxes = {b.name: b.status for b in cluster.containers()}
    running = boxes.get(cluster.container_name(plan.front_end)) == "running"
    sshd_down = set(cluster.sshd_down()) if running else {n.name for n in plan.nodes}
    tree = _tree_or_none(cluster) if running else None
    print(f"{'HOST':10} {'ADDRESS':15} {'CONTAINER':10} {'SSHD':5} TREE")
    front = boxes.get(cluster.container_name(plan.front_end), "missing")
    where = "-" if tree is None else "master"
    print(f"{plan.front_end:10} {plan.front_end_address:15} {front:10} {'':5} {where}")
    for n in plan.nodes:
        state = boxes.get(cluster.container_name(n.name), "missing")
        sshd = "down" if n.name in sshd_down else "up"
        where = "-" if tree is None else tree.get(n.name, "absent")
        print(f"{n.name:10} {n.address:15} {state:10} {sshd:5} {where}")
    up = sum(1 for n in plan.nodes if tree and tree.get(n.name) == "up")
    mode = "" if cluster.daemons else ", --no-daemons"
    what = f"cluster {cluster.name!r} ({plan.locale}{mode}, run {cluster.run_id})"
    master = "no master answers" if tree is None else f"{up} of {len(plan.nodes)} nodes up"
    print(f"{what}: sshd on {len(plan.nodes) - len(sshd_down)}, {master}")
    tree_ok = up == len(plan.nodes) or not cluster.daemons
    return 0 if running and not sshd_down and tree_ok else 1


def do_exec(cluster: Cluster, args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise PlanError("exec needs a command: python -m harness exec -- gproc i")
    plan = cluster.require_plan()
    host = args.node or plan.front_end
    if host != plan.front_end:
        plan.node(host)
    tty = ["-it"] if sys.stdin.isatty() and sys.stdout.isatty() else []
    return subprocess.call(["docker", "exec", *tty, cluster.container_name(host), *argv])


def backend_of(args: argparse.Namespace) -> str:
    if args.command == "images":  # images are Docker's alone
        return "docker"
    if args.backend:
        return args.backend
    if args.command != "up" and NetnsCluster.exists(args.name):
        return "netns"
    return "docker"


def do_netns_status(cluster: NetnsCluster) -> int:
    """One row per host: address, daemon pid, memory, state in the tree."""
    plan = cluster.require_plan()
    try:
        pids: dict[str, int | str] = dict(cluster.pids())
    except HarnessError:
        pids = {}
    try:
        tree: dict[str, str] | None = cluster.tree()
    except HarnessError:
        tree = None
    print(f"{'HOST':10} {'ADDRESS':15} {'PID':>8} TREE")
    where = "-" if tree is None else "master"
    front = pids.get(plan.front_end, "-")
    print(f"{plan.front_end:10} {plan.front_end_address:15} {front:>8} {where}")
    for n in plan.nodes:
        state = "-" if tree is None else tree.get(n.name, "absent")
        print(f"{n.name:10} {n.address:15} {pids.get(n.name, '-'):>8} {state}")
    up = sum(1 for n in plan.nodes if tree and tree.get(n.name) == "up")
    master = "no master answers" if tree is None else f"{up} of {len(plan.nodes)} nodes up"
    print(f"netns cluster {cluster.name!r} ({plan.locale}, run {cluster.run_id}): {master}")
    return 0 if up == len(plan.nodes) else 1


def dispatch_netns(args: argparse.Namespace) -> int:
    cluster = NetnsCluster(args.name)
    if args.command == "up":
        cluster.up(args.nodes, args.locale, args.racksize, args.timeout or NETNS_TIMEOUT)
        print(f"netns cluster {args.name!r} up: {args.nodes} nodes on {args.locale}")
    elif args.command == "down":
        print(f"removed {cluster.down()} namespaces of {args.name!r}")
    elif args.command == "status":
        return do_netns_status(cluster.attach())
    elif args.command == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise PlanError("exec needs a command: python -m harness exec -- gproc i")
        return cluster.attach().interactive(argv, args.node)
    elif args.command == "fault":
        if args.fault not in NETNS_FAULTS:
            raise PlanError(f"the netns backend has no fault {args.fault!r}: {NETNS_FAULTS}")
        cluster.attach().fault(args.fault, args.node)
    elif args.command == "heal":
        cluster.attach().heal(args.nodes or None)
    elif args.command == "reload":
        cluster.attach().reload()
    else:
        raise PlanError(f"the netns backend has no command {args.command!r}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    if backend_of(args) == "netns":
        return dispatch_netns(args)
    if args.command == "up" and args.racksize is not None:
        raise PlanError("--racksize is for --backend netns")
    if args.command == "fault" and args.fault not in FAULTS:
        raise PlanError(f"the docker backend has no fault {args.fault!r}: {', '.join(FAULTS)}")
    if args.command == "up" and args.timeout is None:
        args.timeout = READY_TIMEOUT
    if args.command == "images":
        images = build_images()
        print(f"node {images.node}\nfrontend {images.frontend}")
        return 0
    if args.command == "up":
        make_plan(args.locale, args.nodes, args.subnet)  # bad input fails before Docker is asked
    cluster = Cluster(args.name)
    if args.command == "up":
        cluster.up(args.nodes, args.locale, args.subnet, args.timeout, not args.no_daemons)
        what = "containers and sshd, no daemons" if args.no_daemons else f"on {args.locale}"
        print(f"cluster {args.name!r} up: {args.nodes} nodes {what}")
    elif args.command == "down":
        print(f"removed {cluster.down()} containers of {args.name!r}")
    elif args.command == "status":
        return do_status(cluster.attach())
    elif args.command == "exec":
        return do_exec(cluster.attach(), args)
    elif args.command == "fault":
        inject(cluster.attach(), args.fault, args.node)
    elif args.command == "heal":
        heal(cluster.attach(), args.nodes or None)
    elif args.command == "reload":
        cluster.attach().reload()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except PlanError as error:
        print(f"harness: error: {error}", file=sys.stderr)
        return 2
    except (HarnessError, ImageError, ToolError, docker.errors.DockerException) as error:
        print(f"harness: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
