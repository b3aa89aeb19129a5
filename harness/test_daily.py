"""Daily-use features across kane's 80 nodes: input, nodes by name, timeouts, signals."""

from __future__ import annotations

from .checks import by_node, gproc, names

MIB32 = 32 << 20


def test_32_mib_of_input_reaches_every_node(cluster):
    make = cluster.exec(["sh", "-c", f"head -c {MIB32} /dev/urandom > /tmp/input32"])
    assert make.status == 0, make.err
    try:
        res = cluster.exec(
            ["sh", "-c", "gproc e ./. /usr/bin/wc -c < /tmp/input32"], workdir="/root", timeout=300
        )
    finally:
        cluster.exec(["rm", "-f", "/tmp/input32"])
    assert res.status == 0, res.err
    assert by_node(res) == {n: [str(MIB32)] for n in names(1, 80)}


def test_nodes_by_name_wherever_they_sit(cluster):
    res = gproc(cluster, "e", "-w", "kn[1-40]", "-x", "kn20", "/bin/hostname")
    assert res.status == 0, res.err
    out = by_node(res)
    assert set(out) == names(1, 40) - {"kn20"}, "kn20 only relayed to its rack"
    assert all(lines == [node] for node, lines in out.items())
    res = gproc(cluster, "e", "-w", "kn5,kn99", "/bin/hostname")
    assert res.status == 255
    assert by_node(res) == {"kn5": ["kn5"]}
    assert "unreachable: kn99 (not in the tree)" in res.err, res.err


def test_u_kills_every_node_still_running(cluster):
    res = gproc(cluster, "e", "-u", "2", "./.", "/bin/sleep", "60")
    assert res.status == 124, res.err
    assert "gproc: timed out: kn[1-80]" in res.err, res.err


SIGNAL_SCRIPT = """
program='trap "echo got TERM; exit 3" TERM; echo ready; while :; do sleep 0.05; done'
gproc e ./. /bin/sh -c "$program" > /tmp/sig.out 2> /tmp/sig.err &
job=$!
tries=0
until [ "$(grep -c ': ready$' /tmp/sig.out)" -ge 80 ]; do
    tries=$((tries + 1)); [ $tries -gt 1200 ] && { echo "not ready"; kill -KILL $job; exit 9; }
    sleep 0.05
done
kill -TERM $job
wait $job
echo "status $?"
"""


def test_sigterm_to_gproc_reaches_every_program(cluster):
    res = cluster.exec(["sh", "-c", SIGNAL_SCRIPT], workdir="/root", timeout=300)
    out = cluster.exec(["cat", "/tmp/sig.out"]).out
    cluster.exec(["rm", "-f", "/tmp/sig.out", "/tmp/sig.err"])
    assert res.out.strip() == "status 3", res.out + res.err
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        node, _, text = line.partition(": ")
        got.setdefault(node, []).append(text)
    assert got == {n: ["ready", "got TERM"] for n in names(1, 80)}


def test_cp_and_rcp_across_kane(cluster):
    make = "mkdir -p /tmp/cpsrc/d && echo payload > /tmp/cpsrc/d/f && chmod 600 /tmp/cpsrc/d/f"
    assert cluster.exec(["sh", "-c", make]).status == 0
    try:
        res = gproc(cluster, "cp", "./.", "/tmp/cpsrc/d", "/tmp/")
        assert res.status == 0, res.err
        assert set(by_node(res)) == names(1, 80)
        seen = cluster.on_nodes(["stat", "-c", "%a %s", "/tmp/d/f"])
        assert {n: r.out.strip() for n, r in seen.items()} == {n: "600 8" for n in names(1, 80)}

        cluster.exec(["mkdir", "-p", "/tmp/gathered"])
        res = gproc(cluster, "rcp", "./.", "/etc/hostname", "/tmp/gathered")
        assert res.status == 0, res.err
        listing = cluster.exec(["sh", "-c", "cd /tmp/gathered && grep -H . hostname.*"]).out
        got = dict(line.split(":", 1) for line in listing.splitlines())
        assert got == {f"hostname.{n}": n for n in names(1, 80)}, "each node's own file"
    finally:
        cluster.exec(["rm", "-rf", "/tmp/cpsrc", "/tmp/gathered"])
        cluster.on_nodes(["rm", "-rf", "/tmp/d"])
