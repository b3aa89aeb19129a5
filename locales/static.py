"""A topology written down in a file, for clusters nobody wants to write a locale for.

Pass the file as the locale (``-locale=/etc/gproc/cluster.toml``); ``.json`` files are
read as JSON, ``.toml`` files as TOML. The format, in JSON::

    {
      "master": {"name": "fe", "address": "10.0.0.1", "port": 6666},
      "nodes": [
        {"name": "r1", "number": 1, "address": "10.0.0.11", "parent": "fe"},
        {"name": "n2", "number": 2, "address": "10.0.0.12", "parent": "r1", "id": 1},
        {"name": "n3", "number": 3, "address": "10.0.0.13", "parent": "r1", "id": 2,
         "port": 7000, "bin_root": "/scratch/xproc"}
      ]
    }

and the same in TOML::

    [master]
    name = "fe"
    address = "10.0.0.1"

    [[nodes]]
    name = "r1"
    number = 1
    address = "10.0.0.11"
    parent = "fe"

``master``: ``name`` and ``address`` (how nodes reach it) are required; ``port``
defaults to -cmdport. Each of ``nodes``: ``name`` (the output label), ``number`` (the
node's number in the cluster, what -myId names), ``address`` (how its children reach
it) and ``parent`` (the master's name or another node's) are required; ``id`` (what
its parent knows it by) defaults to ``number``; ``port`` (where it serves its
children) defaults to the master's port, then -cmdport; ``bin_root`` defaults to
-binRoot. Levels follow from the parent chain, so a tree may be as deep as needed.
Every daemon listens on 0.0.0.0 at its port. A daemon finds its own entry by -myId
(its number) or else by its hostname (the full name or the part before the first dot).

The whole file is checked when it is loaded, and every complaint names the file and
the entry: unknown or missing fields, wrong types, duplicate names or numbers, unknown
parents, two children with one id under one parent, and parent cycles.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Host, Locale, LocaleError, LocaleOptions, Placement, check_range

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_TOP_FIELDS = {"master": (dict, True), "nodes": (list, True)}
_MASTER_FIELDS = {"name": (str, True), "address": (str, True), "port": (int, False)}
_NODE_FIELDS = {
    "name": (str, True),
    "number": (int, True),
    "address": (str, True),
    "parent": (str, True),
    "id": (int, False),
    "port": (int, False),
    "bin_root": (str, False),
}
_KINDS = {str: "a non-empty string", int: "an integer", dict: "a table/object", list: "a list"}
_BOUNDS = {"number": (1, None), "id": (0, None), "port": (1, 65535)}


@dataclass(frozen=True)
class MasterEntry:
    """The ``master`` table; port None means "use -cmdport"."""

    name: str
    address: str
    port: int | None


@dataclass(frozen=True)
class NodeEntry:
    """One checked ``nodes`` entry, with its level worked out from the parent chain."""

    name: str
    number: int
    address: str
    parent: str
    node_id: int
    port: int | None
    bin_root: str | None
    level: int


@dataclass(frozen=True)
class Topology:
    """A checked topology file."""

    path: Path
    master: MasterEntry
    nodes: tuple[NodeEntry, ...]


def _fail(path: Path, where: str, problem: str) -> LocaleError:
    return LocaleError(f"topology file {path}: {where}: {problem}")


def _has_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) and value != ""


def _check_value(path: Path, where: str, key: str, value: Any, kind: type) -> None:
    if not _has_kind(value, kind):
        raise _fail(path, where, f"field {key!r} must be {_KINDS[kind]}, not {value!r}")
    low, high = _BOUNDS.get(key, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f"{low} or more"
        raise _fail(path, where, f"field {key!r} is {value}, must be {bounds}")


def _check_fields(path: Path, where: str, entry: Any, schema: dict) -> dict[str, Any]:
    """Check one table against its schema: no unknown, missing or mistyped fields."""
    if not isinstance(entry, dict):
        raise _fail(path, where, f"must be {_KINDS[dict]}")
    unknown = sorted(set(entry) - set(schema))
    if unknown:
        raise _fail(path, where, f"unknown field(s) {', '.join(unknown)}")
    for key, (kind, required) in schema.items():
        if key in entry:
            _check_value(path, where, key, entry[key], kind)
        elif required:
            raise _fail(path, where, f"missing field {key!r}")
    return entry


def _levels(path: Path, master: str, parents: dict[str, str]) -> dict[str, int]:
    """Each node's depth below the master; a parent chain that loops is an error."""
    levels: dict[str, int] = {}
    for start in parents:
        chain: list[str] = []
        current = start
        while current != master and current not in levels:
            if current in chain:
                loop = " -> ".join([*chain[chain.index(current) :], current])
                raise _fail(path, f"node {start!r}", f"parent cycle {loop}")
            chain.append(current)
            current = parents[current]
        depth = 0 if current == master else levels[current]
        for member in reversed(chain):
            depth += 1
            levels[member] = depth
    return levels


def _check_links(path: Path, master: MasterEntry, raw: list[dict[str, Any]]) -> None:
    """Names and numbers unique, parents known, ids unique under each parent."""
    names, numbers, slots = {master.name}, set(), set()
    known = {master.name} | {entry["name"] for entry in raw}
    for index, entry in enumerate(raw):
        where = f"nodes[{index}] ({entry['name']!r})"
        slot = (entry["parent"], entry.get("id", entry["number"]))
        if entry["name"] in names:
            raise _fail(path, where, f"duplicate name {entry['name']!r}")
        if entry["number"] in numbers:
            raise _fail(path, where, f"duplicate number {entry['number']}")
        if entry["parent"] not in known:
            raise _fail(
                path,
                where,
                f"unknown parent {entry['parent']!r} (name the master {master.name!r} "
                "or another node)",
            )
        if slot in slots:
            raise _fail(path, where, f"duplicate id {slot[1]} under parent {slot[0]!r}")
        names.add(entry["name"])
        numbers.add(entry["number"])
        slots.add(slot)


def check_topology(path: Path, data: Any) -> Topology:
    """Turn parsed file contents into a :class:`Topology`, or say exactly what is wrong."""
    top = _check_fields(path, "top level", data, _TOP_FIELDS)
    master_raw = _check_fields(path, "master", top["master"], _MASTER_FIELDS)
    master = MasterEntry(master_raw["name"], master_raw["address"], master_raw.get("port"))
    raw = [
        _check_fields(path, f"nodes[{index}]", entry, _NODE_FIELDS)
        for index, entry in enumerate(top["nodes"])
    ]
    _check_links(path, master, raw)
    levels = _levels(path, master.name, {entry["name"]: entry["parent"] for entry in raw})
    nodes = tuple(
        NodeEntry(
            name=entry["name"],
            number=entry["number"],
            address=entry["address"],
            parent=entry["parent"],
            node_id=entry.get("id", entry["number"]),
            port=entry.get("port"),
            bin_root=entry.get("bin_root"),
            level=levels[entry["name"]],
        )
        for entry in raw
    )
    return Topology(path, master, nodes)


def load_topology(path: Path) -> Topology:
    """Read and check a .json or .toml topology file."""
    try:
        text = path.read_text()
    except OSError as error:
        raise LocaleError(f"cannot read topology file {path}: {error.strerror}") from error
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except ValueError as error:
        raise LocaleError(f"topology file {path} does not parse: {error}") from error
    return check_topology(path, data)


class Static(Locale):
    """A locale that looks every answer up in a checked topology file."""

    name = "static"

    def __init__(self, opts: LocaleOptions, topology: Topology) -> None:
        super().__init__(opts)
        self.topology = topology
        self.by_name = {node.name: node for node in topology.nodes}
        self.by_number = {node.number: node for node in topology.nodes}

    def _port(self, node: NodeEntry | MasterEntry) -> int:
        master_port = self.topology.master.port
        fallback = self.opts.cmdport if master_port is None else master_port
        return fallback if node.port is None else node.port

    def master_listen(self) -> tuple[str, int]:
        return "0.0.0.0", self._port(self.topology.master)

    def master_name(self) -> str:
        return self.topology.master.name

    def _own_entry(self, number: int | None) -> NodeEntry:
        number = self.opts.my_id if number is None else number
        if number is not None:
            if number not in self.by_number:
                raise LocaleError(f"no node numbered {number} in {self.topology.path} (-myId)")
            return self.by_number[number]
        hostname = self.opts.hostname
        for candidate in (hostname, hostname.split(".")[0]):
            if candidate in self.by_name:
                return self.by_name[candidate]
        raise LocaleError(
            f"cannot tell which node of {self.topology.path} this is from hostname "
            f"{hostname!r}: run on a host named in the file or pass -myId N"
        )

    def _address(self, name: str) -> tuple[str, int]:
        """Where the node or master called ``name`` serves its children."""
        entry = self.topology.master if name == self.master_name() else self.by_name[name]
        return entry.address, self._port(entry)

    def place(self, number: int | None = None) -> Placement:
        node = self._own_entry(number)
        return Placement(
            name=node.name,
            number=node.number,
            node_id=node.node_id,
            level=node.level,
            parent=self._address(node.parent),
            listen=("0.0.0.0", self._port(node)),
            bin_root=self.opts.bin_root if node.bin_root is None else node.bin_root,
        )

    def hosts(self, low: int, high: int) -> list[Host]:
        check_range(low, high)
        chosen = sorted(
            (node for node in self.topology.nodes if low <= node.number <= high),
            key=lambda node: node.number,
        )
        return [Host(n.name, n.number, n.address, n.level, n.parent) for n in chosen]


def static_factory(path: Path) -> Callable[[LocaleOptions], Locale]:
    """Load and check the file once; the result builds a :class:`Static` per options."""
    return functools.partial(Static, topology=load_topology(path))
