"""gproc-deploy over real SSH: the front-end deploys to 80 nodes that run sshd and no gproc.

The deployer runs on the front-end as an operator would run it there (root, the default
identity ~/.ssh/id_ed25519 and ~/.ssh/known_hosts the harness put there), through
``docker exec``. The module's cluster has no gproc daemon (``bare_cluster``); the tests run
in file order, each bringing the tree to the state it starts from.
"""

from __future__ import annotations

import re
import time

import pytest

from harness.cluster import Cluster, Result
from harness.faults import heal, inject

from .checks import by_node, gproc, gproc_processes, names

# One worker runs the whole module, in file order (harness/conftest.py makes -n N group it).
pytestmark = pytest.mark.xdist_group("deploy")

UP = ("up", "1", "80", "--locale", "kane")
DOWN = ("down", "--locale", "kane")
_HOST = re.compile(r"^(kn\d+)\s+(ok|UNREACHABLE|FAILED|SKIPPED)\s+(.*)$")
ACCEPT = "--accept-new-host-keys"


def deploy(cluster: Cluster, *args: str) -> Result:
    """``gproc-deploy ARGS`` on the front-end; it must never end in a traceback."""
    res = cluster.exec(["gproc-deploy", *args], timeout=600)
    assert "Traceback" not in res.out + res.err, res.out + res.err
    return res


def hosts(res: Result) -> dict[str, tuple[str, str]]:
    """Host -> (state, detail) from the report, one line per host."""
    return {m[1]: (m[2], m[3]) for m in map(_HOST.match, res.lines()) if m}


def states(res: Result) -> dict[str, str]:
    return {host: state for host, (state, _) in hosts(res).items()}


def timed_up(cluster: Cluster, *extra: str) -> tuple[Result, float]:
    t = time.monotonic()
    res = deploy(cluster, *UP, *extra)
    return res, time.monotonic() - t


@pytest.fixture(scope="module")
def first_up(bare_cluster: Cluster) -> tuple[Result, float]:
    """The first ``up``: no node holds gproc yet (``bare_cluster`` wiped every trace)."""
    return timed_up(bare_cluster)


def test_up_starts_every_host(bare_cluster, first_up):
    res, _ = first_up
    assert res.status == 0, res.out + res.err
    assert hosts(res) == {n: ("ok", "started") for n in names(1, 80)}
    assert "artifact uploaded to 80" in res.out
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert run.status == 0, run.err
    assert by_node(run) == {n: [n] for n in names(1, 80)}


def test_status_shows_four_racks_of_nineteen(bare_cluster, first_up):
    res = deploy(bare_cluster, "status")
    assert res.status == 0, res.err
    rows = [line.split() for line in res.lines()[1:-1]]
    racks = {name: path for path, name, _, level, _ in rows if level == "1"}
    assert set(racks) == {"kn20", "kn40", "kn60", "kn80"}
    for rack_master, path in racks.items():
        top = int(rack_master[2:])
        below = {r[1] for r in rows if r[3] == "2" and r[0].startswith(f"{path}/")}
        assert below == names(top - 19, top - 1), rack_master
    assert all(r[4] == "up" for r in rows)
    assert res.lines()[-1] == "80 nodes below cesspool: 80 up, 0 lost"


def test_up_again_uploads_and_restarts_nothing(bare_cluster, first_up):
    _, first = first_up
    res, again = timed_up(bare_cluster)
    assert res.status == 0, res.out + res.err
    assert hosts(res) == {n: ("ok", "already running") for n in names(1, 80)}
    assert "artifact uploaded to 0" in res.out
    assert "the master is already running" in res.out
    assert again < first / 2, f"repeat up took {again:.1f}s, the first {first:.1f}s"


def test_down_leaves_no_gproc_and_can_be_repeated(bare_cluster):
    assert deploy(bare_cluster, *UP).status == 0
    res = deploy(bare_cluster, *DOWN)
    assert res.status == 0, res.out + res.err
    assert hosts(res) == {n: ("ok", "stopped") for n in names(1, 80)}
    assert "stopped the master" in res.out
    assert gproc_processes(bare_cluster) == {}
    again = deploy(bare_cluster, *DOWN)
    assert again.status == 0, again.out + again.err
    assert hosts(again) == {n: ("ok", "not running") for n in names(1, 80)}
    assert "the master was not running" in again.out


def test_unreachable_node_and_rack_master(bare_cluster):
    """kn5's sshd is stopped: the rest of rack 1 comes up. kn40 is off the network: its 19
    nodes are SKIPPED. Either makes the exit status 1."""
    assert deploy(bare_cluster, *DOWN).status == 0
    inject(bare_cluster, "sshd-stop", "kn5")
    inject(bare_cluster, "disconnect", "kn40")
    try:
        res = deploy(bare_cluster, *UP)
    finally:
        heal(bare_cluster, daemons=False)
    assert res.status == 1, res.out + res.err
    want = {n: "ok" for n in names(1, 80)} | {n: "SKIPPED" for n in names(21, 39)}
    assert states(res) == want | {"kn5": "UNREACHABLE", "kn40": "UNREACHABLE"}
    detail = hosts(res)
    assert detail["kn5"][1].startswith("cannot connect to 10.1.30.5:22"), detail["kn5"]
    assert detail["kn40"][1].startswith("cannot connect to 10.1.30.40:22"), detail["kn40"]
    assert detail["kn21"][1] == "its parent kn40 is UNREACHABLE"
    assert "21 of 80 hosts are not ok" in res.out
    rack1 = gproc(bare_cluster, "e", "1/.", "/bin/hostname")
    assert rack1.status == 0, rack1.err
    assert set(by_node(rack1)) == names(1, 20) - {"kn5"}
    assert res.lines()[-1] == "59 nodes below cesspool: 59 up, 0 lost"


def test_unknown_host_key_is_refused_until_accepted(bare_cluster):
    empty = "/tmp/empty_known_hosts"
    assert bare_cluster.exec(["sh", "-c", f": > {empty}"]).status == 0
    res = deploy(bare_cluster, *UP, "--known-hosts", empty)
    assert res.status == 1
    assert states(res) == {n: "UNREACHABLE" for n in names(1, 80)}
    for host, (_, detail) in hosts(res).items():
        assert "unknown host key" in detail and ACCEPT in detail, (host, detail)
    accepted = deploy(bare_cluster, *UP, "--known-hosts", empty, ACCEPT)
    assert accepted.status == 0, accepted.out + accepted.err
    assert set(states(accepted).values()) == {"ok"}
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert by_node(run) == {n: [n] for n in names(1, 80)}


def test_accepted_host_keys_are_remembered(bare_cluster):
    """After ``--accept-new-host-keys`` every node's key is in the file: the next run trusts
    them all without the switch."""
    fresh = "/tmp/accepted_known_hosts"
    assert bare_cluster.exec(["sh", "-c", f": > {fresh}"]).status == 0
    assert deploy(bare_cluster, *UP, "--known-hosts", fresh, ACCEPT).status == 0
    res = deploy(bare_cluster, *UP, "--known-hosts", fresh)
    assert states(res) == {n: "ok" for n in names(1, 80)}
    assert res.status == 0
