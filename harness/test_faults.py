"""Faults: lost nodes are reported, the rest of the cluster keeps working."""

from __future__ import annotations

import threading
import time

from harness.faults import add_intruder, inject, remove_intruder

from .checks import by_node, gproc, names


def test_rack_master_killed_during_a_job(own_cluster):
    result = {}
    job = threading.Thread(
        target=lambda: result.update(
            res=gproc(own_cluster, "e", "./.", "/bin/sh", "-c", "sleep 6; echo finished")
        )
    )
    job.start()
    time.sleep(3)
    inject(own_cluster, "kill", "kn20")
    job.join(60)
    res = result["res"]
    assert res.status != 0
    assert by_node(res) == {n: ["finished"] for n in names(21, 80)}
    assert "kn[1-20]" in res.err and "lost" in res.err
    after = gproc(own_cluster, "e", "2-4/.", "/bin/hostname")
    assert after.status == 0, after.err
    assert set(by_node(after)) == names(21, 80)


def test_stopped_leaf_is_reported(own_cluster):
    """The master's tree marks it lost; a job naming it says so and fails."""
    inject(own_cluster, "stop", "kn5")
    time.sleep(1)
    assert own_cluster.tree()["kn5"] == "lost"
    info = own_cluster.exec(["gproc", "i"]).lines()[-1]
    assert info == "80 nodes below cesspool: 79 up, 1 lost"
    res = gproc(own_cluster, "e", "1/1-6", "/bin/hostname")
    assert res.status == 255
    assert set(by_node(res)) == {"kn20", "kn1", "kn2", "kn3", "kn4", "kn6"}
    assert "unreachable: kn5 (lost)" in res.err, res.err
    rest = gproc(own_cluster, "e", "1/.", "/bin/hostname")
    assert set(by_node(rest)) == names(1, 20) - {"kn5"}


def test_wrong_key_cannot_join(own_cluster):
    intruder = add_intruder(own_cluster)
    try:
        deadline = time.monotonic() + 20
        while own_cluster.daemon_alive(intruder) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not own_cluster.daemon_alive(intruder), "the intruder's daemon kept running"
        log = own_cluster.exec(["cat", "/var/log/gproc.log"], host=intruder).out
        assert "Traceback" not in log and log.strip(), log
        assert intruder not in own_cluster.tree()
        assert own_cluster.exec(["gproc", "i"]).lines()[-1].startswith("80 nodes")
    finally:
        remove_intruder(own_cluster, intruder)
