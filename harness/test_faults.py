"""Faults: lost nodes are reported, the rest of the cluster keeps working."""

from __future__ import annotations

import uuid

from harness.cluster import run_dir
from harness.faults import add_intruder, inject, remove_intruder
from harness.waiting import wait_until

from .checks import Running, by_node, gproc, names


def test_rack_master_killed_during_a_job(own_cluster):
    """The job has started on all 80 nodes when kn20 dies, and ends only when told to."""
    # The host's run directory is every container's /opt/gproc (read-only there): a file
    # made in it on the host is the go every node's job waits for.
    go = f"go-{uuid.uuid4().hex[:8]}"
    host_go = run_dir(own_cluster.name) / "opt" / go
    script = f"echo started; while [ ! -e /opt/gproc/{go} ]; do sleep 0.1; done; echo finished"
    job = Running(own_cluster, "e", "./.", "/bin/sh", "-c", script)
    try:
        wait_until(
            lambda: job.saying("started"),
            120,
            "the job to start on all 80 nodes",
            lambda started: started == names(1, 80),
            interval=0.2,
        )
        inject(own_cluster, "kill", "kn20")
    finally:
        host_go.touch()  # the job ends, whether or not the test got this far
        res = job.wait(120)
        host_go.unlink()
    assert res.status != 0
    out = by_node(res)
    assert set(out) == names(1, 80)
    assert {n for n, lines in out.items() if lines == ["started", "finished"]} == names(21, 80)
    assert "kn[1-20]" in res.err and "lost" in res.err
    after = gproc(own_cluster, "e", "2-4/.", "/bin/hostname")
    assert after.status == 0, after.err
    assert set(by_node(after)) == names(21, 80)


def test_stopped_leaf_is_reported(own_cluster):
    """The master's tree marks it lost; a job naming it says so and fails."""
    inject(own_cluster, "stop", "kn5")
    wait_until(lambda: own_cluster.tree().get("kn5"), 60, "kn5 to be lost", lambda s: s == "lost")
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
        wait_until(
            lambda: own_cluster.daemon_alive(intruder),
            20,
            "the intruder's daemon to give up",
            lambda alive: not alive,
            interval=0.5,
        )
        log = own_cluster.exec(["cat", "/var/log/gproc.log"], host=intruder).out
        assert "Traceback" not in log and log.strip(), log
        assert intruder not in own_cluster.tree()
        assert own_cluster.exec(["gproc", "i"]).lines()[-1].startswith("80 nodes")
    finally:
        remove_intruder(own_cluster, intruder)
