"""A job reaches exactly the nodes its spec names, and each line says which node printed it."""

from __future__ import annotations

from .checks import by_node, gproc, names


def test_all_80_print_their_own_hostname(cluster):
    res = gproc(cluster, "e", "./.", "/bin/hostname")
    assert res.status == 0, res.err
    assert len(res.lines()) == 80
    out = by_node(res)
    assert set(out) == names(1, 80)
    assert all(lines == [node] for node, lines in out.items())


def test_dot_is_the_rack_masters(cluster):
    res = gproc(cluster, "e", ".", "/bin/hostname")
    assert res.status == 0, res.err
    assert by_node(res) == {n: [n] for n in ("kn20", "kn40", "kn60", "kn80")}


def test_one_slash_dot_is_the_first_rack(cluster):
    res = gproc(cluster, "e", "1/.", "/bin/hostname")
    assert res.status == 0, res.err
    assert set(by_node(res)) == names(1, 20)


def test_kf_dot_and_range_are_all_80(own_cluster):
    own_cluster.switch_locale("kf")
    tree = own_cluster.exec(["gproc", "i"])
    assert tree.lines()[-1] == "80 nodes below cesspool: 80 up, 0 lost"
    assert all(line.split()[3] == "1" for line in tree.lines()[2:-1])
    for spec in (".", "1-80"):
        res = gproc(own_cluster, "e", spec, "/bin/hostname")
        assert res.status == 0, res.err
        out = by_node(res)
        assert set(out) == names(1, 80), spec
        assert all(lines == [node] for node, lines in out.items())
