"""Private mounts: a job sees its own files under binRoot and leaves nothing behind."""

from __future__ import annotations

from .checks import by_node, gproc, names

JOB = "echo mine-$(hostname) > /tmp/xproc/mine && cat /tmp/xproc/mine && ls /tmp/xproc"


def leftovers(cluster) -> dict[str, str]:
    found = cluster.on_nodes(["sh", "-c", "ls -A /tmp/xproc 2>/dev/null"])
    return {n: r.out.split() for n, r in found.items() if r.out.strip()}


def test_private_job_sees_its_files_and_leaves_nothing(cluster):
    res = gproc(cluster, "e", "./.", "/bin/sh", "-c", JOB)
    assert res.status == 0, res.err
    out = by_node(res)
    assert set(out) == names(1, 80)
    for node, lines in out.items():
        assert lines[0] == f"mine-{node}"
        assert {"mine", "bin", "lib"} <= set(lines[1:]), lines
    assert leftovers(cluster) == {}


def test_without_p_the_files_stay(own_cluster):
    res = gproc(own_cluster, "e", "-p=false", "./.", "/bin/sh", "-c", JOB)
    assert res.status == 0, res.err
    left = leftovers(own_cluster)
    assert set(left) == names(1, 80)
    assert all("mine" in files for files in left.values())
