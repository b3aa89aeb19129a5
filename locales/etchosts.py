"""A flat cluster described by /etc/hosts: the master is the host called ``master``.

This fits clusters (and Docker networks) where every node can resolve the others by
name but nobody computed a topology: each node registers with ``master`` on
-cmdport (or -parent), with its trailing hostname digits as its id (node7 -> 7), or
-myId. Names of the form ``<prefix><digits>`` in /etc/hosts are the nodes; only the
first (canonical) name of each line counts, so aliases such as FQDNs are not doubled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .base import Host, Locale, LocaleError, LocaleOptions, Placement, check_range, parse_address

MASTER = "master"
_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class _Entry:
    address: str
    names: tuple[str, ...]


def _read_hosts(path: Path) -> list[_Entry]:
    """The address lines of a hosts file, comments and blank lines dropped."""
    try:
        text = path.read_text()
    except OSError as error:
        raise LocaleError(f"cannot read {path}: {error.strerror}") from error
    entries = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            entries.append(_Entry(fields[0], tuple(fields[1:])))
    return entries


def _number(name: str) -> int | None:
    """The trailing digits of a host's short name (node12.example -> 12)."""
    match = _TRAILING_NUMBER.search(name.split(".")[0])
    return None if match is None else int(match.group(1))


class EtcHosts(Locale):
    """Every node directly under the host named ``master`` in /etc/hosts."""

    name = "etchosts"

    def __init__(self, opts: LocaleOptions, hosts_path: str | Path = "/etc/hosts") -> None:
        super().__init__(opts)
        self.hosts_path = Path(hosts_path)

    def master_listen(self) -> tuple[str, int]:
        return "0.0.0.0", self.opts.cmdport

    def master_name(self) -> str:
        return MASTER

    def parent_address(self) -> tuple[str, int]:
        """-parent wins; otherwise the address /etc/hosts gives ``master``."""
        if self.opts.parent is not None:
            return parse_address(self.opts.parent, self.opts.cmdport)
        for entry in _read_hosts(self.hosts_path):
            if MASTER in entry.names:
                return entry.address, self.opts.cmdport
        raise LocaleError(f"no host named {MASTER!r} in {self.hosts_path}: add one or pass -parent")

    def own_number(self) -> int:
        if self.opts.my_id is not None:
            return self.opts.my_id
        number = _number(self.opts.hostname)
        if number is None:
            raise LocaleError(
                f"cannot tell which node this is from hostname {self.opts.hostname!r} "
                "(no trailing digits): pass -myId N"
            )
        return number

    def place(self, number: int | None = None) -> Placement:
        """This daemon is labelled by its hostname; another node by its /etc/hosts name."""
        n = self.own_number() if number is None else number
        name = self.opts.hostname if number is None else self._name_of(n)
        return Placement(
            name=name,
            number=n,
            node_id=n,
            level=1,
            parent=self.parent_address(),
            listen=("0.0.0.0", self.opts.cmdport),
            bin_root=self.opts.bin_root,
        )

    def _name_of(self, number: int) -> str:
        for host in self.hosts(number, number):
            return host.name
        raise LocaleError(f"no host numbered {number} in {self.hosts_path}")

    def hosts(self, low: int, high: int) -> list[Host]:
        """Hosts numbered low..high, by number then name; ``master`` is never a node."""
        check_range(low, high)
        found = {}
        for entry in _read_hosts(self.hosts_path):
            name = entry.names[0]
            number = _number(name)
            if name != MASTER and number is not None and low <= number <= high:
                found.setdefault(name, Host(name, number, entry.address, 1, MASTER))
        return sorted(found.values(), key=lambda host: (host.number, host.name))
