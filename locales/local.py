"""Every daemon on this machine, on loopback: the tree without containers.

The KANE rule with racks of 4 (-racksize): with 8 nodes, n4 and n8 are rack masters
(ids 1 and 2) and n1..n3, n5..n7 hang under them with ids 1..3. Ports keep the
daemons apart: the master listens on -cmdport and node N on -cmdport + N. Each node
gets its own binRoot (<-binRoot>/nN) so slaves never share files. -parent is not
consulted: the master is always on this machine.
"""

from __future__ import annotations

from .base import LocaleError
from .racks import RackTree

LOOPBACK = "127.0.0.1"


class Local(RackTree):
    """A small tree of daemons on 127.0.0.1, for tests and a first try."""

    name = "local"
    default_rack_size = 4

    def node_name(self, number: int) -> str:
        return f"n{number}"

    def address(self, number: int) -> str:
        return LOOPBACK

    def listen(self, number: int) -> tuple[str, int]:
        port = self.opts.cmdport + number
        if port > 65535:
            raise LocaleError(f"node n{number} would listen on port {port}: lower -cmdport")
        return LOOPBACK, port

    def front_end(self) -> tuple[str, int]:
        return self.master_listen()

    def own_number(self) -> int:
        """All local daemons share a hostname, so only -myId can tell them apart."""
        if self.opts.my_id is None:
            raise LocaleError("the local locale cannot tell nodes apart: pass -myId N")
        return self.opts.my_id

    def bin_root(self, number: int) -> str:
        return f"{self.opts.bin_root.rstrip('/')}/n{number}"

    def master_listen(self) -> tuple[str, int]:
        return LOOPBACK, self.opts.cmdport

    def master_name(self) -> str:
        return "master"
