"""Shipping: a program whose libraries only the front-end has runs on all 80 nodes."""

from __future__ import annotations

import hashlib

from .checks import by_node, gproc, names

JQ_LIBS = "ls /usr/lib/x86_64-linux-gnu | grep -E '^lib(jq|onig)' || true"


def test_nodes_lack_jq_and_its_libraries(cluster):
    """The premise of the shipping test: without gproc's bundle, jq cannot run on a node."""
    fe = cluster.exec(["sh", "-c", JQ_LIBS])
    assert "libjq.so.1" in fe.out and "libonig.so.5" in fe.out
    for node, res in cluster.on_nodes(["sh", "-c", f"command -v jq; {JQ_LIBS}"]).items():
        assert res.out.strip() == "", f"{node} has jq or its libraries: {res.out}"


def test_jq_from_the_front_end_runs_everywhere(cluster):
    res = gproc(cluster, "e", "./.", "/usr/bin/jq", "-n", "[1,2,3] | add")
    assert res.status == 0, res.err
    assert by_node(res) == {n: ["6"] for n in names(1, 80)}


def test_sqlite3_runs_everywhere(cluster):
    res = gproc(cluster, "e", "./.", "/usr/bin/sqlite3", ":memory:", "select 6*7;")
    assert res.status == 0, res.err
    assert by_node(res) == {n: ["42"] for n in names(1, 80)}


def test_f_files_reach_every_node(cluster):
    """A file and a directory shipped with -f, read in the job's working directory."""
    setup = "mkdir -p /root/ship/dir && head -c 300000 /dev/urandom > /root/ship/data.bin"
    setup += " && echo inside > /root/ship/dir/note.txt"
    assert cluster.exec(["sh", "-c", setup]).status == 0
    data = cluster.exec(["sh", "-c", "cat /root/ship/data.bin | od -An -v -tx1"]).out
    want = hashlib.sha256(bytes.fromhex("".join(data.split()))).hexdigest()
    res = gproc(
        cluster,
        "e",
        "-f",
        "data.bin,dir",
        "./.",
        "/bin/sh",
        "-c",
        "sha256sum data.bin | cut -d' ' -f1; cat dir/note.txt",
        cwd="/root/ship",
    )
    assert res.status == 0, res.err
    assert by_node(res) == {n: [want, "inside"] for n in names(1, 80)}
