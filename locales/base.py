"""What every locale provides, and how a locale is found by name.

A locale answers "where does this daemon sit in the tree?" from what a daemon can see
where it runs (hostname, /etc/hosts, switches). Locales are code because real
topologies are computed; a static topology file covers the clusters nobody wants to
write code for. Locales come from three places, tried in this order: the built-ins
(so a zipapp without package metadata still finds them), the ``gproc.locales`` entry
point group (for locales shipped by other packages), and a ``.json``/``.toml`` path.
"""

from __future__ import annotations

import importlib
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

from gproc.errors import GprocError

ENTRY_POINT_GROUP = "gproc.locales"

# Built-in locales by name, as "module:Class" under this package, imported only when used.
BUILTIN = {
    "local": "local:Local",
    "kane": "kane:Kane",
    "kf": "kane:KaneFlat",
    "kane3": "kane:KaneRows",
    "etchosts": "etchosts:EtcHosts",
}


class LocaleError(GprocError, ValueError):
    """The locale cannot place this daemon; the message says which switch fixes it.

    Still a ValueError, as it was, for code that catches a bad value that way.
    """


@dataclass(frozen=True)
class LocaleOptions:
    """The switches a locale may consult, with the seed's defaults."""

    cmdport: int = 6666  # -cmdport
    parent: str | None = None  # -parent (host or host:port)
    bin_root: str = "/tmp/xproc"  # -binRoot
    my_id: int | None = None  # -myId: which node this daemon is (else from the hostname)
    rack_size: int | None = None  # -racksize; None = locale default
    hostname: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class Placement:
    """Where one slave sits: whom it registers with and where it serves its own children."""

    name: str  # node name used to label output, e.g. "kn12"
    number: int  # the node's number N in the cluster (kn12 -> 12)
    node_id: int  # the id its parent knows it by
    level: int  # 1 = child of the master, 2 = below a rack master, ...
    parent: tuple[str, int]  # (host, port) of the parent
    listen: tuple[str, int]  # (host, port) this slave serves its own children on
    bin_root: str


@dataclass(frozen=True)
class Host:
    """One node as the deployer and the container harness see it."""

    name: str
    number: int
    address: str
    level: int
    parent: str  # the parent's name; the master's name for level 1


class Locale(ABC):
    """The topology of one kind of cluster."""

    name: ClassVar[str]

    def __init__(self, opts: LocaleOptions) -> None:
        self.opts = opts

    @abstractmethod
    def master_listen(self) -> tuple[str, int]:
        """Where `gproc m` listens for its children."""

    @abstractmethod
    def master_name(self) -> str:
        """The label of the master in `gproc i`, and the parent name of level-1 hosts."""

    @abstractmethod
    def place(self, number: int | None = None) -> Placement:
        """This slave's place (``number`` defaults to -myId, else to the hostname)."""

    @abstractmethod
    def hosts(self, low: int, high: int) -> list[Host]:
        """Nodes ``low``..``high``, for the deployer and the container harness."""


def check_range(low: int, high: int) -> None:
    """Reject node ranges that would silently yield nothing."""
    if low < 1 or high < low:
        raise LocaleError(f"bad node range {low}..{high}: give 1 <= low <= high")


def parse_address(text: str, default_port: int, switch: str = "-parent") -> tuple[str, int]:
    """Split "host", "host:port", "[v6]:port" or a bare IPv6 address into (host, port)."""
    host, port = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise LocaleError(f"bad address {text!r} for {switch}: write [v6-address]:port")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise LocaleError(f"bad address {text!r} for {switch}: the host is empty")
    if not port:
        return host, default_port
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise LocaleError(f"bad port {port!r} in {text!r} for {switch}: give 1..65535")
    return host, int(port)


LocaleFactory = type[Locale] | Callable[[LocaleOptions], Locale]


def _builtin(name: str) -> LocaleFactory:
    module, _, attr = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def _from_entry_point(name: str) -> LocaleFactory | None:
    point = next((p for p in entry_points(group=ENTRY_POINT_GROUP) if p.name == name), None)
    if point is None:
        return None
    try:
        return point.load()
    except Exception as error:  # a broken plug-in must not look like a missing one
        raise LocaleError(f"locale {name!r} ({point.value}) failed to load: {error}") from error


def known_names() -> list[str]:
    """Every locale name that :func:`find_locale` accepts, for error messages and help."""
    return sorted(set(BUILTIN) | {point.name for point in entry_points(group=ENTRY_POINT_GROUP)})


def find_locale(name: str) -> LocaleFactory:
    """Resolve a -locale value to something that builds a :class:`Locale` from options."""
    if name in BUILTIN:
        return _builtin(name)
    found = _from_entry_point(name)
    if found is not None:
        return found
    if name.lower().endswith((".json", ".toml")):
        from .static import static_factory

        return static_factory(Path(name))
    raise LocaleError(
        f"unknown locale {name!r}: use -locale with one of {', '.join(known_names())}, "
        "or a topology file ending in .json or .toml"
    )


def load_locale(name: str, opts: LocaleOptions) -> Locale:
    """Find a locale by name and build it for these options."""
    return find_locale(name)(opts)
