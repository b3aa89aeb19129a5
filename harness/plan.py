"""The address plan of an emulated cluster, computed by the gproc locale itself.

The harness never writes its own copy of the KANE rules: names, addresses, levels and
parents come from ``load_locale(...).hosts()``, so the containers sit exactly where the
daemons' locale expects them and the locale runs unchanged.

KANE hard-codes 10.1.x.y. Where 10.1.0.0/16 is taken, ``--subnet`` moves the cluster: the
addresses keep their last two octets inside the new /16 (or larger) network, and since the
kane and kf locales would then compute addresses that do not exist, the daemons are given an
equivalent static topology file (same names, ids and tree) as their locale instead.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from gproc.locales import LocaleError, LocaleOptions, load_locale

KANE_SUBNET = "10.1.0.0/16"
FRONT_END = "cesspool"
LOCALES = ("kane", "kf", "kane3")
TOPOLOGY_PATH = "/opt/gproc/topology.json"  # in the mounted code directory


class PlanError(ValueError):
    """The cluster cannot be laid out as asked; the message says which switch to change."""


@dataclass(frozen=True)
class Node:
    """One node container: its hostname, number, address, tree level and id under its parent."""

    name: str
    number: int
    address: str
    level: int
    parent: str
    node_id: int


@dataclass(frozen=True)
class Plan:
    """Everything ``up`` needs to place containers and start daemons."""

    locale: str
    subnet: str
    gateway: str
    front_end: str  # the front-end's hostname (the master's name)
    front_end_address: str
    nodes: tuple[Node, ...]
    rack_size: int | None = None  # -racksize for the daemons; None: the locale's own

    @property
    def translated(self) -> bool:
        """True when the addresses are not the locale's own (another --subnet)."""
        return self.subnet != KANE_SUBNET

    def daemon_locale(self) -> str:
        """What the daemons get as -locale: the built-in one, or the topology file."""
        return TOPOLOGY_PATH if self.translated else self.locale

    def levels(self) -> list[list[Node]]:
        """Nodes grouped by tree level, parents first: the order daemons must start in."""
        depth = max(n.level for n in self.nodes)
        return [[n for n in self.nodes if n.level == lv] for lv in range(1, depth + 1)]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise PlanError(f"no node {name!r} in this cluster (kn1..kn{len(self.nodes)})")

    def children(self, name: str) -> list[Node]:
        return [n for n in self.nodes if n.parent == name]

    def topology(self) -> str:
        """The static-topology JSON equivalent of this plan, for a translated subnet."""
        master = {"name": self.front_end, "address": self.front_end_address}
        nodes = [
            {"name": n.name, "number": n.number, "address": n.address, "parent": n.parent}
            | {"id": n.node_id}
            for n in self.nodes
        ]
        return json.dumps({"master": master, "nodes": nodes}, indent=1)


def make_plan(
    locale: str, count: int, subnet: str = KANE_SUBNET, rack_size: int | None = None
) -> Plan:
    """Lay out ``count`` nodes of ``locale`` on ``subnet``; bad input raises PlanError."""
    if locale not in LOCALES:
        raise PlanError(f"unknown locale {locale!r} for the harness: use one of {LOCALES}")
    if count < 1:
        raise PlanError(f"bad node count {count}: give --nodes 1 or more")
    if rack_size is not None and rack_size < 1:
        raise PlanError(f"bad rack size {rack_size}: give --racksize 1 or more")
    net = _network(subnet)
    try:
        loc = load_locale(locale, LocaleOptions(hostname=FRONT_END, rack_size=rack_size))
        hosts = loc.hosts(1, count)
    except LocaleError as error:
        raise PlanError(str(error)) from None
    move = _mover(net)
    nodes = tuple(
        Node(h.name, h.number, move(h.address), h.level, h.parent, loc.place(h.number).node_id)
        for h in hosts
    )
    front = move(loc.front_end()[0])  # type: ignore[attr-defined]
    gateway = str(net.network_address + 1)
    used = {n.address for n in nodes} | {front}
    if gateway in used:
        raise PlanError(f"the gateway {gateway} of {subnet} collides with a node address")
    return Plan(locale, str(net), gateway, FRONT_END, front, nodes, rack_size)


def _network(subnet: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(subnet)
    except ValueError as error:
        raise PlanError(f"bad --subnet {subnet!r}: {error}") from None
    if net.prefixlen > 16:
        raise PlanError(f"--subnet {subnet} is too small: KANE needs a /16 (or larger)")
    return net


def _mover(net: ipaddress.IPv4Network):  # noqa: ANN202 - a small closure
    """Map a 10.1.x.y address to the same x.y inside ``net``."""
    kane = ipaddress.IPv4Network(KANE_SUBNET)

    def move(address: str) -> str:
        addr = ipaddress.IPv4Address(address)
        if addr not in kane:
            raise PlanError(f"locale address {address} is outside {KANE_SUBNET}")
        return str(net.network_address + (int(addr) - int(kane.network_address)))

    return move
