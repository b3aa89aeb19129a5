"""-reconnect: a parent that restarts (a rolling upgrade's master) does not take its subtree
down; without it, a slave exits with its parent, as the original did."""

from __future__ import annotations

from pathlib import Path

from conftest import Tree, assert_clean_logs, start_tree, wait_until

from gproc.client import fetch_tree, tree_rows

NODES = [f"n{i}" for i in range(1, 9)]


def states(tree: Tree) -> dict[str, str]:
    try:
        return {name: st for _, name, _, _, st in tree_rows(fetch_tree(tree.uds))[1:]}
    except Exception:  # noqa: BLE001 - no master yet: nothing registered
        return {}


def test_the_tree_survives_its_master_restarting(tmp_path: Path) -> None:
    t = start_tree(tmp_path / "tree", reconnect=60)
    try:
        pids = {n: t.pid(n) for n in NODES}
        t.launcher.daemons.stop(["master"])
        t.launcher.up(1, 8, timeout=30, say=lambda _msg: None)  # the master, anew
        wait_until(
            lambda: states(t),
            30,
            "all 8 registered again",
            lambda s: set(s.values()) == {"up"} and len(s) == 8,
        )  # noqa: E501
        assert {n: t.pid(n) for n in NODES} == pids, "no slave restarted"
        r = t.gproc("e", "./.", "/bin/echo", "back")
        assert r.returncode == 0, r.stderr
        assert sorted(r.stdout.splitlines()) == sorted(f"{n}: back" for n in NODES)
        log = (t.root / "state" / "n4.log").read_text()
        assert "registering again within 60s (-reconnect)" in log
    finally:
        t.launcher.down()
    assert_clean_logs(t)


def test_without_reconnect_a_slave_exits_with_its_parent(tmp_path: Path) -> None:
    t = start_tree(tmp_path / "tree", nodes=4)
    try:
        t.launcher.daemons.stop(["master"])
        running = lambda: [n for n in ("n1", "n2", "n3", "n4") if t.launcher.pid(n)]  # noqa: E731
        wait_until(running, 30, "every slave gone", lambda left: not left)
    finally:
        t.launcher.down()


def test_a_parent_that_never_returns_is_waited_for_only_so_long(tmp_path: Path) -> None:
    t = start_tree(tmp_path / "tree", nodes=4, reconnect=1)
    try:
        t.launcher.daemons.stop(["master"])
        wait_until(lambda: t.launcher.pid("n4"), 30, "n4 to give up after 1s", lambda p: not p)
        log = (t.root / "state" / "n4.log").read_text()
        assert "parent did not come back within 1s; exiting" in log
    finally:
        t.launcher.down()


def test_a_drained_node_is_left_out_of_new_jobs_saying_why(tree: Tree) -> None:
    from gproc.client import drain

    held = tree.popen("e", "2/.", "/bin/sh", "-c", "echo up; exec sleep 60")  # until killed
    try:
        assert held.stdout.readline().endswith(": up\n")
        assert drain(tree.uds, ["n5"], True) != [], "the job on n5..n8 still runs"
        r = tree.gproc("e", "./.", "/bin/true")
        assert r.returncode == 255
        assert "unreachable: n5 (draining: gproc-deploy is upgrading it)" in r.stderr
        assert "exit status" not in r.stderr, "the other 7 ran"
    finally:
        held.kill()
        held.wait()
    wait_until(lambda: drain(tree.uds, ["n5"], True), 30, "no job on n5", lambda busy: not busy)
    assert drain(tree.uds, ["n5"], False) == []
    assert tree.gproc("e", "./.", "/bin/true").returncode == 0
