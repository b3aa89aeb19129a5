"""What ``gproc e`` prints from what the nodes send: labels, long lines, partial lines."""

from __future__ import annotations

import io

import pytest

from gproc.output import MAX_LINE, Printer

CHUNK = 64 << 10  # what one output frame carries


def text(size: int) -> bytes:
    """``size`` bytes of every value but the newline, in an order that shows any shift."""
    values = bytes(v for v in range(256) if v != ord("\n"))
    return (values * (size // len(values) + 1))[:size]


def printer() -> tuple[Printer, io.BytesIO, io.BytesIO]:
    out, err = io.BytesIO(), io.BytesIO()
    return Printer(out=out, err=err), out, err


def feed(p: Printer, node: str, data: bytes, size: int = CHUNK, fd: int = 1) -> None:
    for start in range(0, len(data), size):
        p.output(node, fd, data[start : start + size])


def test_lines_are_labelled_and_split_across_chunks() -> None:
    p, out, err = printer()
    p.output("kn1", 1, b"hel")
    p.output("kn2", 1, b"other\n")
    p.output("kn1", 1, b"lo\nwor")
    p.output("kn1", 2, b"oops\n")
    p.output("kn1", 1, b"ld\n\nlast")
    p.exited("kn1", 0)
    p.exited("kn2", 0)
    assert p.finish() == 0
    assert out.getvalue() == b"kn2: other\nkn1: hello\nkn1: world\nkn1: \nkn1: last\n"
    assert err.getvalue() == b"kn1: oops\n"


def test_a_32_mib_line_comes_out_whole_in_labelled_pieces() -> None:
    """One 32 MiB line, 64 KiB a frame: 1 MiB pieces, the first under "n1: ", the rest under
    "n1+: ", then the next line as usual; nothing lost, added or reordered."""
    line = text(32 << 20)
    assert len(line) == 32 << 20
    p, out, _ = printer()
    feed(p, "n1", line + b"\nnext\n")
    p.exited("n1", 0)
    p.finish()
    pieces = [line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE)]
    expected = b"n1: " + pieces[0] + b"\n"
    expected += b"".join(b"n1+: " + piece + b"\n" for piece in pieces[1:])
    assert out.getvalue() == expected + b"n1: next\n"


@pytest.mark.parametrize("size", [997, CHUNK, MAX_LINE, 3 * MAX_LINE])
def test_pieces_do_not_depend_on_how_frames_cut_the_line(size: int) -> None:
    line = text(MAX_LINE) + b"tail"  # pieces of MAX_LINE and 4 bytes
    exact = b"x" * MAX_LINE  # a line of exactly MAX_LINE bytes stays whole
    p, out, _ = printer()
    feed(p, "n1", line + b"\n" + exact + b"\nend", size=size)
    p.exited("n1", 0)
    p.finish()
    head = b"n1: " + line[:MAX_LINE] + b"\nn1+: tail\n"
    assert out.getvalue() == head + b"n1: " + exact + b"\nn1: end\n"


def test_a_node_that_prints_no_newline_shows_its_output_as_it_goes() -> None:
    """Everything but the last piece is on the terminal before the line ends; the rest comes
    when the node exits. Other nodes' lines are never held up or glued to it."""
    p, out, _ = printer()
    feed(p, "n1", b"y" * (5 * MAX_LINE + 100))
    shown = out.getvalue()
    assert shown == b"n1: " + b"y" * MAX_LINE + b"\n" + (b"n1+: " + b"y" * MAX_LINE + b"\n") * 4
    p.output("n2", 1, b"short\n")
    assert out.getvalue() == shown + b"n2: short\n"
    p.exited("n1", 0)
    assert out.getvalue() == shown + b"n2: short\n" + b"n1+: " + b"y" * 100 + b"\n"


def test_partial_lines_are_kept_apart_per_node_and_stream() -> None:
    p, out, err = printer()
    for i in range(3):
        p.output("a", 1, b"o%d" % i)
        p.output("b", 1, b"p%d" % i)
        p.output("a", 2, b"e%d" % i)
    p.output("b", 1, b"\n")
    p.node_lost(["a"], "connection reset")
    assert p.finish() == 255
    assert out.getvalue() == b"b: p0p1p2\na: o0o1o2\n"
    assert err.getvalue().startswith(b"a: e0e1e2\n")
    assert b"gproc: lost a: connection reset" in err.getvalue()


def test_raw_passes_a_long_line_through_untouched() -> None:
    out = io.BytesIO()
    p = Printer(raw=True, out=out, err=io.BytesIO())
    data = b"z" * (3 * MAX_LINE) + b"\n"
    feed(p, "n1", data)
    p.exited("n1", 0)
    p.finish()
    assert out.getvalue() == data


def test_gproc_i_folds_a_big_tree_by_level_and_state() -> None:
    from gproc.client import format_tree

    racks = [
        {
            "id": r,
            "name": f"kn{r * 20}",
            "addr": "a",
            "state": "up",
            "children": [
                {"id": i, "name": f"kn{(r - 1) * 20 + i}", "addr": "a", "state": "up"}
                for i in range(1, 20)
            ],
        }
        for r in range(1, 51)
    ]
    racks[2]["children"][4]["state"] = "lost"  # kn45
    text = format_tree({"name": "cesspool", "addr": "a", "state": "up", "children": racks})
    lines = text.splitlines()
    assert len(lines) < 20 and max(map(len, lines)) <= 100
    assert lines[0].split() == ["LEVEL", "NODES", "STATE", "NAMES"]
    assert lines[2].split()[:3] == ["1", "50", "up"]
    assert lines[2].split()[3].startswith("kn[20,40,60,80,100,")
    assert ["2", "1", "lost", "kn45"] in [line.split() for line in lines]
    assert lines[-1] == "1000 nodes below cesspool: 999 up, 1 lost"
    small = format_tree({"name": "m", "addr": "a", "state": "up", "children": racks[:1]})
    assert len(small.splitlines()) == 1 + 1 + 20 + 1  # up to 100 nodes: a row each
