"""The rack rule shared by KANE and the loopback locale.

Nodes are numbered 1..N and cut into racks of ``rack`` nodes; the last node of each
rack (N % rack == 0) is the rack master: it hangs under the front-end with id
N // rack, and the other nodes of its rack hang under it with id N % rack. Subclasses
only say how a node is named and reached.

The rule is applied as the original gproc applied it, even to a last, partial rack: in
an 85-node cluster of racks of 20, kn81..kn85 name kn100 as their rack master although
kn100 does not exist. Such nodes never register; pick a node count that fills its last
rack, or use a flat locale.
"""

from __future__ import annotations

from abc import abstractmethod

from .base import Host, Locale, LocaleError, LocaleOptions, Placement, check_range


class RackTree(Locale):
    """A two-level tree: front-end -> rack masters -> nodes (subclasses may add levels)."""

    default_rack_size: int = 20

    def __init__(self, opts: LocaleOptions) -> None:
        super().__init__(opts)
        self.rack = self.default_rack_size if opts.rack_size is None else opts.rack_size
        if self.rack < 1:
            raise LocaleError(f"bad rack size {self.rack}: give -racksize 1 or more")

    @abstractmethod
    def node_name(self, number: int) -> str:
        """The label of node ``number``."""

    @abstractmethod
    def address(self, number: int) -> str:
        """The address others use to reach node ``number``."""

    @abstractmethod
    def listen(self, number: int) -> tuple[str, int]:
        """Where node ``number`` serves its own children."""

    @abstractmethod
    def front_end(self) -> tuple[str, int]:
        """Where level-1 nodes find the master."""

    @abstractmethod
    def own_number(self) -> int:
        """Which node this daemon is, when the caller does not say."""

    def bin_root(self, number: int) -> str:
        """Node ``number``'s binRoot; nodes on separate machines can all use -binRoot."""
        return self.opts.bin_root

    def uplink(self, number: int) -> tuple[int | None, int]:
        """(the parent's node number, or None for the front-end; the id under it)."""
        if number % self.rack == 0:
            return None, number // self.rack
        return -(-number // self.rack) * self.rack, number % self.rack

    def level(self, number: int) -> int:
        """1 under the front-end, one more per parent above; deeper rules (rows) need no more."""
        depth = 1
        parent, _ = self.uplink(number)
        while parent is not None:
            depth += 1
            parent, _ = self.uplink(parent)
        return depth

    def place(self, number: int | None = None) -> Placement:
        n = self.own_number() if number is None else number
        if n < 1:
            raise LocaleError(f"bad node number {n}: nodes are numbered from 1 (-myId)")
        parent, node_id = self.uplink(n)
        return Placement(
            name=self.node_name(n),
            number=n,
            node_id=node_id,
            level=self.level(n),
            parent=self.front_end() if parent is None else self.listen(parent),
            listen=self.listen(n),
            bin_root=self.bin_root(n),
        )

    def hosts(self, low: int, high: int) -> list[Host]:
        """Nodes low..high; a partial last rack names its nonexistent master (module doc)."""
        check_range(low, high)
        return [self._host(n) for n in range(low, high + 1)]

    def _host(self, number: int) -> Host:
        parent, _ = self.uplink(number)
        return Host(
            name=self.node_name(number),
            number=number,
            address=self.address(number),
            level=self.level(number),
            parent=self.master_name() if parent is None else self.node_name(parent),
        )
