"""``gproc e -json`` on the 80-node KANE tree: one parseable event per line, every node there."""

from __future__ import annotations

import json

from .checks import names


def test_json_hostname_on_all_80(cluster):
    res = cluster.exec(["gproc", "e", "-json", "./.", "/bin/hostname"], workdir="/root")
    assert res.status == 0, res.err
    events = [json.loads(line) for line in res.lines()]
    assert all(e["v"] == 1 for e in events)
    assert events[0]["event"] == "plan"
    assert set(events[0]["nodes"]) == names(1, 80)
    exits = [e for e in events if e["event"] == "exit"]
    assert len(exits) == 80
    assert {e["node"]: e["status"] for e in exits} == dict.fromkeys(names(1, 80), 0)
    outputs = [e for e in events if e["event"] == "output"]
    assert len(outputs) == 80
    assert all(e["stream"] == "stdout" and e["text"] == e["node"] for e in outputs), [
        e for e in outputs if e.get("text") != e["node"]
    ]
    assert {e["node"] for e in outputs} == names(1, 80)
    summary = events[-1]
    assert summary["event"] == "summary"
    assert summary["status"] == 0
    assert summary["counts"]["ok"] == 80 and len(summary["ok"]) == 80
