"""A shared tree on kane: a user of the front-end runs as itself on every node.

The harness's master serves every user (``-allow all``); the test makes one user, with the
same uid on all 81 containers (as NSS would give it across a real cluster), and removes it
afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .cluster import Cluster

NAME, UID = "gpkane", 23456
MAKE = f"groupadd -g {UID} {NAME} && useradd -u {UID} -g {UID} -M -d /tmp -s /bin/sh {NAME}"
REMOVE = f"userdel {NAME} 2>/dev/null; groupdel {NAME} 2>/dev/null; true"


def hosts(cluster: Cluster) -> list[str]:
    plan = cluster.require_plan()
    return [plan.front_end, *(n.name for n in plan.nodes)]


@pytest.fixture
def kane_user(cluster: Cluster) -> Iterator[str]:
    everywhere = hosts(cluster)
    make = ["sh", "-c", f"{REMOVE}; {MAKE}"]
    made = cluster.pool(lambda h: cluster.exec(make, host=h), everywhere)
    failed = [h for h, r in zip(everywhere, made, strict=True) if r.status != 0]
    assert not failed, f"useradd failed on {failed}: {made[everywhere.index(failed[0])].err}"
    try:
        yield NAME
    finally:
        cluster.pool(lambda h: cluster.exec(["sh", "-c", REMOVE], host=h), everywhere)


def by_node(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def test_a_user_runs_as_itself_on_every_node(cluster: Cluster, kane_user: str) -> None:
    nodes = {n.name for n in cluster.require_plan().nodes}
    run = ["gproc", "e", "./.", "/usr/bin/id", "-un"]
    r = cluster.exec(run, user=str(UID), workdir="/tmp")
    assert r.status == 0, r.err
    assert by_node(r.out) == {n: kane_user for n in nodes}

    gone = cluster.exec(["userdel", kane_user], host="kn5")
    assert gone.status == 0, gone.err
    r = cluster.exec(run, user=str(UID), workdir="/tmp")
    assert r.status == 126, r.out + r.err
    assert by_node(r.out) == {n: kane_user for n in nodes - {"kn5"}}, "79 good lines"
    errors = by_node(r.err)
    assert f"user {kane_user} (uid {UID}) is unknown on kn5" in errors["kn5"], r.err
