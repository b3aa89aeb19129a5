"""``gproc e -json``: one JSON event per line, as docs/OUTPUT.md describes, on its own and on
a local tree of real daemons."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Tree

from gproc.jsonout import EVENTS, JsonPrinter
from gproc.output import MAX_LINE, Printer

ALL = [f"n{i}" for i in range(1, 9)]
DOC = Path(__file__).resolve().parents[1] / "docs" / "OUTPUT.md"


def events(stdout: bytes | str) -> list[dict]:
    """Every line of ``stdout`` as an event; each must be JSON, ASCII, of version 1, of a
    documented kind and with documented fields only."""
    text = stdout.decode("ascii") if isinstance(stdout, bytes) else stdout
    assert text.endswith("\n") or not text, f"a last line without its newline: {text[-200:]!r}"
    out = []
    for line in text.split("\n")[:-1]:
        event = json.loads(line)
        assert line.isascii(), line
        assert event["v"] == 1, line
        assert set(event) - {"v", "event"} <= set(EVENTS[event["event"]]), line
        out.append(event)
    return out


def of(kind: str, evs: list[dict]) -> list[dict]:
    return [e for e in evs if e["event"] == kind]


def data(event: dict) -> bytes:
    """The bytes an output event carries, whichever way it carries them."""
    assert ("text" in event) != ("base64" in event), event
    return event["text"].encode() if "text" in event else base64.b64decode(event["base64"])


def stream_bytes(evs: list[dict], node: str, stream: str = "stdout") -> bytes:
    """A node's exact bytes on one stream, put back together from its output events."""
    pieces = [e for e in of("output", evs) if e["node"] == node and e["stream"] == stream]
    return b"".join(data(e) + (b"\n" if e["newline"] else b"") for e in pieces)


def json_printer() -> tuple[JsonPrinter, io.BytesIO]:
    out = io.BytesIO()
    return JsonPrinter(out=out), out


# ---------------------------------------------------------------- the printer alone


def test_utf8_is_text_and_other_bytes_are_base64() -> None:
    p, out = json_printer()
    p.planned = ["n1"]
    p.output("n1", 1, "héllo wörld\n".encode())
    p.output("n1", 2, b"\xff\xfe bad\n")
    p.exited("n1", 0)
    assert p.finish() == 0
    evs = events(out.getvalue())  # ASCII on the wire: é travels as \u00e9
    assert [e["event"] for e in evs] == ["plan", "output", "output", "exit", "summary"]
    text, raw = of("output", evs)
    assert (text["stream"], text["text"]) == ("stdout", "héllo wörld")
    assert (raw["stream"], "text" in raw, data(raw)) == ("stderr", False, b"\xff\xfe bad")


def test_a_long_line_comes_in_bounded_pieces_marked_cont() -> None:
    """A 2.5 MiB line fed 64 KiB at a time: three pieces of at most MAX_LINE, the 2nd and 3rd
    marked cont, the newline on the last; then a line left without a newline at exit."""
    line = b"x" * (2 * MAX_LINE + MAX_LINE // 2)
    fed = line + b"\nshort\ntail"
    p, out = json_printer()
    for start in range(0, len(fed), 64 << 10):
        p.output("n1", 1, fed[start : start + (64 << 10)])
    p.exited("n1", 0)
    p.finish()
    outs = of("output", events(out.getvalue()))
    assert [(len(data(e)), e["cont"], e["newline"]) for e in outs] == [
        (MAX_LINE, False, False),
        (MAX_LINE, True, False),
        (MAX_LINE // 2, True, True),
        (5, False, True),
        (4, False, False),
    ]
    assert stream_bytes(events(out.getvalue()), "n1") == fed


@pytest.mark.parametrize("size", [1, 7, 4096, MAX_LINE + 3])
def test_the_bytes_come_back_exactly_however_frames_cut_them(size: int) -> None:
    """UTF-8 cut mid-character by a frame, invalid bytes, empty lines, a line over MAX_LINE,
    no final newline: put back together, the events give every byte, in order."""
    fed = "ünïcode\n".encode() * 3 + b"\n\xc3\n" + b"y" * (MAX_LINE + 10) + b"\n\nend"
    p, out = json_printer()
    for start in range(0, len(fed), size):
        p.output("n1", 1, fed[start : start + size])
        p.output("n2", 2, fed[start : start + size])
    p.node_lost(["n1", "n2"], "connection reset")
    assert p.finish() == 255
    evs = events(out.getvalue())
    assert stream_bytes(evs, "n1") == fed
    assert stream_bytes(evs, "n2", "stderr") == fed
    assert all(len(data(e)) <= MAX_LINE for e in of("output", evs))


def test_summary_with_a_lost_node_is_255_and_sorts_nodes_by_outcome() -> None:
    p, out = json_printer()
    p.planned = ["n10", "n2", "n1", "n3", "n4"]
    p.unreachable = []
    p.exited("n10", 0)
    p.exited("n2", 0)
    p.exited("n1", 3)
    p.node_lost(["n3"], "connection reset")
    # n4 never reports: lost at the end, like the labelled printer says
    assert p.finish() == 255
    evs = events(out.getvalue())
    assert [(e["nodes"], e["reason"]) for e in of("lost", evs)] == [
        (["n3"], "connection reset"),
        (["n4"], "no report from the node"),
    ]
    summary = evs[-1]
    assert summary["event"] == "summary"
    assert summary["status"] == 255
    assert summary["counts"] == {
        "planned": 5, "ok": 2, "failed": 1, "lost": 2, "unreachable": 0, "timed_out": 0
    }  # fmt: skip
    assert summary["ok"] == ["n2", "n10"]
    assert summary["failed"] == [{"status": 3, "nodes": ["n1"]}]
    assert summary["lost"] == [
        {"reason": "connection reset", "nodes": ["n3"]},
        {"reason": "no report from the node", "nodes": ["n4"]},
    ]


@pytest.mark.parametrize(
    "script",
    [
        [("exit", "a", 0), ("exit", "b", 0)],
        [("exit", "a", 0), ("exit", "b", 137)],
        [("exit", "a", 2), ("lost", "b", "heartbeat")],
        [("exit", "a", 0)],  # b never reports
        [("exit", "a", 0), ("exit", "b", 0), ("unreachable", "n9 (lost)", None)],
    ],
)
def test_the_status_is_the_labelled_printers(script: list[tuple]) -> None:
    """-json never changes what gproc e exits with."""
    statuses = []
    for printer in (JsonPrinter(out=io.BytesIO()), Printer(out=io.BytesIO(), err=io.BytesIO())):
        printer.planned = ["a", "b"]
        for kind, who, value in script:
            if kind == "exit":
                printer.exited(who, value)
            elif kind == "lost":
                printer.node_lost([who], value)
            else:
                printer.unreachable = [who]
        statuses.append(printer.finish())
    assert statuses[0] == statuses[1]


def test_every_event_and_field_is_documented() -> None:
    doc = DOC.read_text()
    assert '"v"' in doc and "never renamed or removed" in doc
    sections = re.split(r"^### ", doc, flags=re.M)[1:]
    documented = {s.split("\n", 1)[0].strip("`"): s for s in sections}
    assert set(EVENTS) <= set(documented)
    for event, fields in EVENTS.items():
        for field in fields:
            assert f"| `{field}` |" in documented[event], (event, field)


# ---------------------------------------------------------------- on a real tree


def run_json(tree: Tree, *args: str) -> tuple[int, list[dict], str]:
    r = tree.gproc("e", "-json", *args)
    return r.returncode, events(r.stdout), r.stderr


def test_echo_on_8_nodes_is_8_outputs_8_exits_and_a_summary(tree: Tree) -> None:
    status, evs, err = run_json(tree, "./.", "/bin/echo", "hi")
    assert status == 0, err
    assert err == ""
    assert evs[0] == {"v": 1, "event": "plan", "nodes": evs[0]["nodes"]}
    assert sorted(evs[0]["nodes"]) == sorted(ALL)
    outs, exits = of("output", evs), of("exit", evs)
    assert len(outs) == 8 and len(exits) == 8
    assert sorted((e["node"], e["stream"], e["text"]) for e in outs) == [
        (n, "stdout", "hi") for n in sorted(ALL)
    ]
    assert {e["node"]: e["status"] for e in exits} == dict.fromkeys(ALL, 0)
    for node in ALL:  # a node's output comes before its exit
        kinds = [e["event"] for e in evs if e.get("node") == node]
        assert kinds == ["output", "exit"], node
    assert evs[-1]["event"] == "summary" and len(evs) == 1 + 8 + 8 + 1
    assert (evs[-1]["status"], evs[-1]["ok"]) == (0, ALL)


def test_a_failing_node_gives_its_status_in_exit_summary_and_exit_code(tree: Tree) -> None:
    status, evs, _ = run_json(
        tree, "./.", "/bin/sh", "-c", '[ "$GPROC_NODE" = n6 ] && exit 3; exit 0'
    )
    assert status == 3
    assert {e["node"]: e["status"] for e in of("exit", evs)} == {
        n: 3 if n == "n6" else 0 for n in ALL
    }
    summary = evs[-1]
    assert summary["status"] == 3
    assert summary["failed"] == [{"status": 3, "nodes": ["n6"]}]
    assert summary["counts"]["ok"] == 7


def test_bytes_that_are_not_utf8_come_as_base64(tree: Tree) -> None:
    status, evs, err = run_json(
        tree, "1/.", "/bin/sh", "-c", r"printf '\377\376\200 x\n'; printf 'ok\n' >&2"
    )
    assert status == 0, err
    nodes = ["n1", "n2", "n3", "n4"]
    assert sorted(e["node"] for e in of("exit", evs)) == nodes
    for node in nodes:
        assert stream_bytes(evs, node) == b"\xff\xfe\x80 x\n"
        assert stream_bytes(evs, node, "stderr") == b"ok\n"
    assert all("base64" in e for e in of("output", evs) if e["stream"] == "stdout")


def test_unreachable_ids_are_an_event_and_make_255(tree: Tree) -> None:
    status, evs, _ = run_json(tree, "1-3", "/bin/true")
    assert status == 255
    assert [e["what"] for e in of("unreachable", evs)] == ["id 3 under master (no such node)"]
    assert evs[-1]["status"] == 255
    assert evs[-1]["unreachable"] == ["id 3 under master (no such node)"]


@pytest.mark.parametrize("other", ["-raw", "-b"])
def test_json_with_raw_or_fold_is_a_usage_error(tree: Tree, other: str) -> None:
    r = tree.gproc("e", "-json", other, "./.", "/bin/echo", "hi")
    assert r.returncode == 2
    assert r.stdout == ""
    assert f"-json and {other} do not go together" in r.stderr
    assert "usage: gproc" in r.stderr and "Traceback" not in r.stderr


def test_help_names_the_switch_and_the_schema() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gproc", "--help"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0
    assert re.search(r"-json.*\n?.*docs/OUTPUT\.md", r.stdout)
