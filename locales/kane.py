"""KANE, the cluster the original gproc was written for, as a tree (kane) and flat (kf).

Nodes are kn1..knN; node N has the address 10.1.(30 + (N-1)//240).((N-1)%240 + 1),
240 nodes per /24. Every 20th node (-racksize) is a rack master under the front-end
(-parent, default 10.1.254.254); see :mod:`.racks` for the rule and partial racks.
Every daemon listens on its node's own address on -cmdport.

``kane3`` extends the rule one level up for clusters of a thousand nodes and more: racks are
grouped in rows of :data:`ROW_RACKS` racks, and the first node of each row is its row master,
under the front-end with id = the row's number. The row's rack masters hang under it with
id = the rack's place in the row (1..5), and every other node stays under its rack master with
id N % 20. So ``2/3/.`` is row 2's third rack (its rack master and nodes), ``./.`` every row
master and rack master, ``././.`` everyone. The first node is promoted (rather than a rack
master doubling as row master) so that no parent has two children with one id.
"""

from __future__ import annotations

import re

from .base import LocaleError, parse_address
from .racks import RackTree

DEFAULT_FRONT_END = "10.1.254.254"
NODES_PER_SUBNET = 240
ROW_RACKS = 5  # kane3: racks per row
FIRST_SUBNET = 30
_HOSTNAME = re.compile(r"kn(\d+)(?:\..*)?")


class Kane(RackTree):
    """KANE as a tree: front-end -> rack masters (every 20th node) -> nodes."""

    name = "kane"

    def node_name(self, number: int) -> str:
        return f"kn{number}"

    def address(self, number: int) -> str:
        subnet = FIRST_SUBNET + (number - 1) // NODES_PER_SUBNET
        if subnet > 255:
            raise LocaleError(f"node kn{number} is beyond the KANE address plan (10.1.x.y)")
        return f"10.1.{subnet}.{(number - 1) % NODES_PER_SUBNET + 1}"

    def listen(self, number: int) -> tuple[str, int]:
        return self.address(number), self.opts.cmdport

    def front_end(self) -> tuple[str, int]:
        return parse_address(self.opts.parent or DEFAULT_FRONT_END, self.opts.cmdport)

    def own_number(self) -> int:
        """-myId wins; otherwise the N of a knN hostname (a domain suffix is allowed)."""
        if self.opts.my_id is not None:
            return self.opts.my_id
        match = _HOSTNAME.fullmatch(self.opts.hostname)
        if match is None:
            raise LocaleError(
                f"cannot tell which KANE node this is from hostname {self.opts.hostname!r}: "
                "run on a knN host or pass -myId N"
            )
        return int(match.group(1))

    def master_listen(self) -> tuple[str, int]:
        return "0.0.0.0", self.opts.cmdport

    def master_name(self) -> str:
        return self.opts.hostname


class KaneFlat(Kane):
    """KANE without rack masters: every node registers with the front-end, id N."""

    name = "kf"

    def uplink(self, number: int) -> tuple[int | None, int]:
        return None, number


class KaneRows(Kane):
    """KANE three levels deep: front-end -> row masters -> rack masters -> nodes."""

    name = "kane3"

    @property
    def row(self) -> int:
        """Nodes per row."""
        return self.rack * ROW_RACKS

    def uplink(self, number: int) -> tuple[int | None, int]:
        row_index = (number - 1) // self.row  # 0-based
        row_master = row_index * self.row + 1
        if number == row_master:
            return None, row_index + 1
        if number % self.rack == 0:
            return row_master, (number - row_master) // self.rack + 1
        return super().uplink(number)
