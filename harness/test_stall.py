"""One stalled reader stalls its own job only: every other job on the same links goes on."""

from __future__ import annotations

from harness.waiting import wait_until

from .checks import by_node, gproc, names

LINES = 200_000  # about 1.3 MB per node: far more than the windows and pipes on the way hold
STALL = f"""
rm -f /tmp/go /tmp/stall.out /tmp/stall.status /tmp/stall.read
( gproc e 1/. /usr/bin/seq 1 {LINES}; echo "$?" > /tmp/stall.status ) \\
    | sh -c 'until [ -e /tmp/go ]; do sleep .2; done; cat >/tmp/stall.out; : >/tmp/stall.read' \\
    > /dev/null 2>&1 &
"""
CHECK = f"""
import collections, sys
seen = collections.defaultdict(list)
for line in open("/tmp/stall.out"):
    node, _, text = line.rstrip("\\n").partition(": ")
    seen[node].append(text)
want = [str(i) for i in range(1, {LINES} + 1)]
bad = sorted(n for n, lines in seen.items() if lines != want)
print(len(seen), "nodes", "bad:", ",".join(bad) or "none")
"""


def test_a_stalled_reader_leaves_other_jobs_alone(cluster):
    kn1_seq = lambda: cluster.exec(["pgrep", "-f", f"seq 1 {LINES}"], host="kn1").status == 0  # noqa: E731
    cluster.exec(["sh", "-c", STALL], timeout=60)
    try:
        wait_until(kn1_seq, 60, "the stalled job to start on kn1", interval=0.3)
        everywhere = gproc(cluster, "e", "./.", "/bin/hostname", timeout=60)
        assert everywhere.status == 0, everywhere.err
        assert set(by_node(everywhere)) == names(1, 80)
        others = gproc(cluster, "e", "2-4/.", "/bin/echo", "ok", timeout=60)
        assert others.status == 0, others.err
        assert by_node(others) == {n: ["ok"] for n in names(21, 80)}
        assert kn1_seq(), "the stalled job ended before its reader read: no stall was tested"
    finally:
        cluster.exec(["touch", "/tmp/go"])
    ended = ["sh", "-c", "test -s /tmp/stall.status && test -e /tmp/stall.read"]
    ended_ok = lambda: cluster.exec(ended).status == 0  # noqa: E731
    wait_until(ended_ok, 120, "the stalled job to end once read", interval=0.3)
    assert cluster.exec(["cat", "/tmp/stall.status"]).out.strip() == "0"
    check = cluster.exec(["python3", "-c", CHECK], timeout=60)
    assert check.out.strip() == "20 nodes bad: none", check.out + check.err
