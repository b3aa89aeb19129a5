"""The kane tree as the master sees it: 4 rack masters, each with its 19 nodes."""

from __future__ import annotations

import re

from .checks import names


def test_master_children_are_the_four_rack_masters(cluster):
    tree = cluster.exec(["gproc", "i"])
    assert tree.status == 0, tree.err
    rows = [line.split() for line in tree.lines()[1:-1]]
    master, nodes = rows[0], rows[1:]
    assert master[1] == "cesspool"
    level1 = {r[1]: r[0] for r in nodes if r[3] == "1"}
    assert set(level1) == {"kn20", "kn40", "kn60", "kn80"}
    for rack_master, path in level1.items():
        rack = int(rack_master[2:]) // 20
        below = {r[1] for r in nodes if r[3] == "2" and r[0].startswith(f"{path}/")}
        assert below == names(rack * 20 - 19, rack * 20 - 1), rack_master
    assert all(r[4] == "up" for r in nodes)
    assert re.fullmatch(r"80 nodes below cesspool: 80 up, 0 lost", tree.lines()[-1])


def test_addresses_are_the_locales(cluster):
    """Every node registered from the address the kane locale gives it (10.1.30.N)."""
    rows = {line.split()[1]: line.split()[2] for line in cluster.exec(["gproc", "i"]).lines()[2:-1]}
    plan = cluster.require_plan()
    assert rows == {n.name: f"{n.address}:6666" for n in plan.nodes}
    if not plan.translated:
        assert rows["kn20"] == "10.1.30.20:6666" and rows["kn7"] == "10.1.30.7:6666"
    fe = cluster.exec(["cat", "/etc/hostname"])
    assert fe.out.strip() == "cesspool"
