"""What people reach for every day, on a real local tree: stdin, timeouts, nodes by name,
signals. (Machine-readable output and progress have their own modules.)"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import Tree, wait_until

NODES = {f"n{i}" for i in range(1, 9)}


def by_node(text: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        node, _, rest = line.partition(": ")
        lines.setdefault(node, []).append(rest)
    return lines


# ---------------------------------------------------------------- stdin


def test_input_reaches_every_node(tree: Tree) -> None:
    r = tree.gproc("e", "./.", "/bin/cat", input="hi\nthere\n")
    assert r.returncode == 0, r.stderr
    assert by_node(r.stdout) == {n: ["hi", "there"] for n in NODES}


def test_every_byte_of_a_large_input_reaches_every_node(tree: Tree, tmp_path: Path) -> None:
    data = os.urandom(6 << 20)
    source = tmp_path / "input"
    source.write_bytes(data)
    with open(source, "rb") as stdin:
        r = tree.gproc("e", "./.", "/usr/bin/sha256sum", stdin=stdin, timeout=120)
    assert r.returncode == 0, r.stderr
    want = hashlib.sha256(data).hexdigest()
    assert {n: v[0].split()[0] for n, v in by_node(r.stdout).items()} == {n: want for n in NODES}


def test_n_gives_dev_null(tree: Tree) -> None:
    r = tree.gproc("e", "-n", "./.", "/bin/cat", input="not for them\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_a_program_that_reads_no_input_does_not_wait_for_it(tree: Tree) -> None:
    """gproc's input never ends here (a pipe kept open), yet the job ends with its programs."""
    reader, writer = os.pipe()
    try:
        r = tree.gproc("e", "./.", "/bin/echo", "done", stdin=reader, timeout=60)
    finally:
        os.close(reader)
        os.close(writer)
    assert r.returncode == 0, r.stderr
    assert by_node(r.stdout) == {n: ["done"] for n in NODES}


# ---------------------------------------------------------------- timeouts


def test_u_kills_what_still_runs_and_exits_124(tree: Tree) -> None:
    r = tree.gproc("e", "-u", "1", "./.", "/bin/sh", "-c", "echo up; sleep 60", timeout=60)
    assert r.returncode == 124, r.stderr
    assert by_node(r.stdout) == {n: ["up"] for n in NODES}
    assert "gproc: timed out: n[1-8]" in r.stderr, r.stderr


def test_u_leaves_programs_that_finish_in_time_alone(tree: Tree) -> None:
    r = tree.gproc("e", "-u", "30", "./.", "/bin/echo", "quick")
    assert r.returncode == 0, r.stderr
    assert "timed out" not in r.stderr


def test_t_reports_nodes_that_could_not_start_in_time(tree: Tree, tmp_path: Path) -> None:
    """64 MiB of fresh bytes cannot reach a node and be written within 50 ms."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(64 << 20))
    r = tree.gproc("e", "-t", "0.05", "-f", str(big), "./.", "/bin/true", timeout=120)
    assert r.returncode == 124, r.stderr
    assert "gproc: timed out starting: n[1-8]" in r.stderr, r.stderr
    assert "had not started 0.05s after the job arrived (-t)" in r.stderr


def test_negative_timeout_is_a_usage_error(tree: Tree) -> None:
    r = tree.gproc("e", "-u", "-3", "./.", "/bin/true")
    assert r.returncode == 2 and "-u takes seconds" in r.stderr


# ---------------------------------------------------------------- nodes by name


def test_w_runs_on_the_named_nodes_wherever_they_sit(tree: Tree) -> None:
    r = tree.gproc("e", "-w", "n[1-2,5]", "/bin/echo", "here")
    assert r.returncode == 0, r.stderr
    assert set(by_node(r.stdout)) == {"n1", "n2", "n5"}, "the rack masters only relayed"


def test_x_leaves_nodes_out_of_a_spec(tree: Tree) -> None:
    r = tree.gproc("e", "-x", "n3,n8", "./.", "/bin/echo", "here")
    assert r.returncode == 0, r.stderr
    assert set(by_node(r.stdout)) == NODES - {"n3", "n8"}


def test_w_and_x_together_and_with_a_spec(tree: Tree) -> None:
    r = tree.gproc("e", "-w", "n[1-4]", "-x", "n2", "/bin/echo", "here")
    assert set(by_node(r.stdout)) == {"n1", "n3", "n4"}, r.stderr
    r = tree.gproc("e", "-w", "n[1-8]", "2/.", "/bin/echo", "here")
    assert set(by_node(r.stdout)) == {"n5", "n6", "n7", "n8"}, "the spec still applies"


def test_a_name_the_tree_does_not_know_is_reported(tree: Tree) -> None:
    r = tree.gproc("e", "-w", "n1,n77", "/bin/echo", "here")
    assert r.returncode == 255
    assert set(by_node(r.stdout)) == {"n1"}
    assert "unreachable: n77 (not in the tree)" in r.stderr, r.stderr
    r = tree.gproc("e", "-w", "zz9", "/bin/true")
    assert r.returncode == 1 and "selects no live node" in r.stderr


def test_a_bad_node_set_is_a_usage_error(tree: Tree) -> None:
    r = tree.gproc("e", "-w", "n[1-", "/bin/true")
    assert r.returncode == 2 and "-w 'n[1-': not a node set" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- signals

TRAP = 'trap "echo got {name}; exit 3" {name}; echo ready; while :; do sleep 0.05; done'


@pytest.mark.parametrize("name", ["TERM", "USR1", "HUP"])
def test_signals_reach_the_programs_on_every_node(tree: Tree, name: str) -> None:
    proc = tree.popen("e", "./.", "/bin/sh", "-c", TRAP.format(name=name))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: sum("ready" in line for line in lines) == 8, 60, "8 programs ready")
        proc.send_signal(getattr(signal, f"SIG{name}"))
        assert proc.wait(timeout=60) == 3, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    got = by_node("".join(lines))
    assert got == {n: ["ready", f"got {name}"] for n in NODES}


def test_stdin_and_signals_need_no_terminal(tree: Tree) -> None:
    """-n and a pipe both work when gproc's input is closed altogether."""
    r = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", *tree.gproc_argv("e", "./.", "/bin/echo", "ok")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tree.root,
    )
    assert r.returncode == 0, r.stderr
    assert by_node(r.stdout) == {n: ["ok"] for n in NODES}


def test_json_names_the_nodes_that_timed_out(tree: Tree) -> None:
    import json

    r = tree.gproc("e", "-json", "-u", "1", "./.", "/bin/sleep", "60", timeout=60)
    assert r.returncode == 124, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    late = [e for e in events if e["event"] == "timeout"]
    assert {n for e in late for n in e["nodes"]} == NODES and {e["phase"] for e in late} == {"run"}
    summary = events[-1]
    assert summary["event"] == "summary" and summary["status"] == 124
    assert summary["timed_out"] == [
        {"phase": "run", "nodes": sorted(NODES, key=lambda n: int(n[1:]))}
    ]
