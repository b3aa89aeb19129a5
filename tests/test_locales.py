"""Locales: KANE arithmetic, the loopback tree, /etc/hosts, topology files, lookup by name."""

import json
from collections import Counter
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from gproc.errors import GprocError
from gproc.locales import (
    Host,
    Locale,
    LocaleError,
    LocaleOptions,
    Placement,
    base,
    find_locale,
    load_locale,
)
from gproc.locales.etchosts import EtcHosts
from gproc.locales.kane import Kane, KaneFlat, KaneRows
from gproc.locales.local import Local
from gproc.locales.static import Static


def kane(**options) -> Kane:
    return Kane(LocaleOptions(hostname="cesspool", **options))


# --- KANE -------------------------------------------------------------------------------


def test_kane_leaf_hangs_under_its_rack_master() -> None:
    assert kane().place(1) == Placement(
        name="kn1",
        number=1,
        node_id=1,
        level=2,
        parent=("10.1.30.20", 6666),
        listen=("10.1.30.1", 6666),
        bin_root="/tmp/xproc",
    )


def test_kane_rack_masters_hang_under_the_front_end() -> None:
    kn20 = kane().place(20)
    assert (kn20.node_id, kn20.level, kn20.parent) == (1, 1, ("10.1.254.254", 6666))
    assert kn20.listen == ("10.1.30.20", 6666)
    kn40 = kane().place(40)
    assert (kn40.node_id, kn40.level) == (2, 1)


def test_kane_addresses_wrap_every_240_nodes() -> None:
    assert kane().place(240).listen[0] == "10.1.30.240"
    kn241 = kane().place(241)
    assert kn241.listen == ("10.1.31.1", 6666)
    assert (kn241.parent, kn241.node_id) == (("10.1.31.20", 6666), 1)
    assert kane().place(39).parent == ("10.1.30.40", 6666)
    assert kane().place(39).node_id == 19


def test_kane_switches() -> None:
    custom = kane(cmdport=7000, parent="fe.example:9000", bin_root="/scratch", rack_size=10)
    kn10 = custom.place(10)
    assert (kn10.parent, kn10.node_id, kn10.bin_root) == (("fe.example", 9000), 1, "/scratch")
    assert custom.place(11).parent == ("10.1.30.20", 7000)
    assert kane(parent="10.0.0.1").place(20).parent == ("10.0.0.1", 6666)
    assert kane(cmdport=7000).master_listen() == ("0.0.0.0", 7000)
    assert kane().master_name() == "cesspool"


def test_kane_flat_puts_every_node_under_the_front_end() -> None:
    flat = KaneFlat(LocaleOptions(hostname="kn45"))
    kn45 = flat.place()
    assert (kn45.name, kn45.node_id, kn45.level) == ("kn45", 45, 1)
    assert kn45.parent == ("10.1.254.254", 6666)
    assert flat.place(20).node_id == 20
    assert {host.level for host in flat.hosts(1, 80)} == {1}
    assert {host.parent for host in flat.hosts(1, 80)} == {"kn45"}


def test_kane_hosts_form_four_racks_of_twenty() -> None:
    hosts = kane().hosts(1, 80)
    assert [host.number for host in hosts] == list(range(1, 81))
    masters = [host for host in hosts if host.level == 1]
    assert [host.name for host in masters] == ["kn20", "kn40", "kn60", "kn80"]
    assert {host.parent for host in masters} == {"cesspool"}
    children = Counter(host.parent for host in hosts if host.level == 2)
    assert children == {"kn20": 19, "kn40": 19, "kn60": 19, "kn80": 19}
    assert hosts[0] == Host("kn1", 1, "10.1.30.1", 2, "kn20")


def test_kane3_rows_of_five_racks_under_their_first_node() -> None:
    rows = KaneRows(LocaleOptions(hostname="cesspool"))
    place = {n: rows.place(n) for n in (1, 2, 20, 21, 40, 100, 101, 141, 160, 1000)}
    # (parent address, id, level): kn1 and kn101 are row masters, every 20th a rack master
    assert {n: (p.parent[0], p.node_id, p.level) for n, p in place.items()} == {
        1: ("10.1.254.254", 1, 1),
        2: ("10.1.30.20", 2, 3),
        20: ("10.1.30.1", 1, 2),
        21: ("10.1.30.40", 1, 3),
        40: ("10.1.30.1", 2, 2),
        100: ("10.1.30.1", 5, 2),
        101: ("10.1.254.254", 2, 1),
        141: ("10.1.30.160", 1, 3),
        160: ("10.1.30.101", 3, 2),
        1000: ("10.1.33.181", 5, 2),
    }
    hosts = rows.hosts(1, 1000)
    assert Counter(h.level for h in hosts) == {1: 10, 2: 50, 3: 940}
    slots = Counter((h.parent, rows.place(h.number).node_id) for h in hosts)
    assert max(slots.values()) == 1  # no parent has two children with one id


def test_kane3_follows_the_rack_size() -> None:
    rows = KaneRows(LocaleOptions(hostname="cesspool", rack_size=5))
    hosts = {h.name: h for h in rows.hosts(1, 40)}
    assert [n for n, h in hosts.items() if h.level == 1] == ["kn1", "kn26"]
    assert [n for n, h in hosts.items() if h.parent == "kn26"] == ["kn30", "kn35", "kn40"]
    assert [n for n, h in hosts.items() if h.parent == "kn40"] == [f"kn{n}" for n in range(36, 40)]


def test_kane_partial_last_rack_names_its_missing_master() -> None:
    hosts = kane().hosts(81, 85)
    assert {host.parent for host in hosts} == {"kn100"}
    assert kane().place(85).parent == ("10.1.30.100", 6666)


@pytest.mark.parametrize(
    ("hostname", "number"), [("kn1", 1), ("kn12", 12), ("kn241.kane.example", 241)]
)
def test_kane_number_from_hostname(hostname: str, number: int) -> None:
    assert Kane(LocaleOptions(hostname=hostname)).place().number == number


def test_kane_my_id_beats_hostname() -> None:
    assert Kane(LocaleOptions(hostname="kn3", my_id=7)).place().name == "kn7"


@pytest.mark.parametrize("hostname", ["foo", "kn", "knx1", "xkn1", "kn1a"])
def test_kane_unknown_hostname_tells_what_to_do(hostname: str) -> None:
    with pytest.raises(LocaleError) as caught:
        Kane(LocaleOptions(hostname=hostname)).place()
    assert str(caught.value) == (
        f"cannot tell which KANE node this is from hostname {hostname!r}: "
        "run on a knN host or pass -myId N"
    )


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"rack_size": 0}, "-racksize"),
        ({"parent": "fe:99999"}, "-parent"),
        ({"parent": ":6666"}, "-parent"),
        ({"my_id": 0}, "-myId"),
    ],
)
def test_kane_bad_switches(options: dict, text: str) -> None:
    with pytest.raises(LocaleError, match=text):
        kane(**options).place(20 if "my_id" not in options else None)


def test_parent_accepts_ipv6() -> None:
    assert kane(parent="[fd00::1]:7000").place(20).parent == ("fd00::1", 7000)
    assert kane(parent="fd00::1").place(20).parent == ("fd00::1", 6666)


def test_bad_host_range() -> None:
    with pytest.raises(LocaleError, match="bad node range"):
        kane().hosts(5, 2)


# --- local ------------------------------------------------------------------------------


def test_local_tree_of_eight() -> None:
    local = Local(LocaleOptions(cmdport=6000, bin_root="/tmp/gp"))
    placed = {n: local.place(n) for n in range(1, 9)}
    assert {n: (p.level, p.node_id) for n, p in placed.items()} == {
        1: (2, 1),
        2: (2, 2),
        3: (2, 3),
        4: (1, 1),
        5: (2, 1),
        6: (2, 2),
        7: (2, 3),
        8: (1, 2),
    }
    assert placed[4].parent == placed[8].parent == ("127.0.0.1", 6000) == local.master_listen()
    assert placed[2].parent == ("127.0.0.1", 6004) == placed[4].listen
    assert placed[7].parent == ("127.0.0.1", 6008) == placed[8].listen
    assert placed[7].listen == ("127.0.0.1", 6007)
    assert (placed[7].name, placed[7].bin_root) == ("n7", "/tmp/gp/n7")
    assert len({p.listen for p in placed.values()} | {local.master_listen()}) == 9


def test_local_hosts() -> None:
    hosts = Local(LocaleOptions()).hosts(1, 8)
    assert [(h.name, h.level, h.parent) for h in hosts if h.level == 1] == [
        ("n4", 1, "master"),
        ("n8", 1, "master"),
    ]
    assert {h.address for h in hosts} == {"127.0.0.1"}
    assert Counter(h.parent for h in hosts) == {"n4": 3, "n8": 3, "master": 2}


def test_local_takes_the_node_from_my_id_only() -> None:
    assert Local(LocaleOptions(my_id=3, hostname="kn5")).place().name == "n3"
    with pytest.raises(LocaleError, match="pass -myId N"):
        Local(LocaleOptions(hostname="kn5")).place()


def test_local_rack_size_switch() -> None:
    local = Local(LocaleOptions(rack_size=2))
    assert (local.place(2).level, local.place(3).parent) == (1, ("127.0.0.1", 6670))


# --- /etc/hosts -------------------------------------------------------------------------

HOSTS = """\
# comment line
127.0.0.1   localhost
::1         localhost ip6-localhost ip6-loopback
10.9.0.1    master  fe.example   # the front-end
10.9.0.11   node1   node1.example
10.9.0.12   node2
10.9.0.13   node13
10.9.0.20   storage
"""


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    return path


def etchosts(hosts_file: Path, **options) -> EtcHosts:
    return EtcHosts(LocaleOptions(**options), hosts_path=hosts_file)


def test_etchosts_places_under_master(hosts_file: Path) -> None:
    placed = etchosts(hosts_file, hostname="node2", cmdport=7000).place()
    assert placed == Placement(
        name="node2",
        number=2,
        node_id=2,
        level=1,
        parent=("10.9.0.1", 7000),
        listen=("0.0.0.0", 7000),
        bin_root="/tmp/xproc",
    )


def test_etchosts_switches(hosts_file: Path) -> None:
    locale = etchosts(hosts_file, hostname="whatever", my_id=5, parent="10.0.0.9:7100")
    placed = locale.place()
    assert (placed.name, placed.node_id, placed.parent) == ("whatever", 5, ("10.0.0.9", 7100))
    assert etchosts(hosts_file, hostname="node1.example").place().number == 1
    assert etchosts(hosts_file).place(13).name == "node13"


def test_etchosts_hosts(hosts_file: Path) -> None:
    assert etchosts(hosts_file).hosts(1, 12) == [
        Host("node1", 1, "10.9.0.11", 1, "master"),
        Host("node2", 2, "10.9.0.12", 1, "master"),
    ]
    assert [h.name for h in etchosts(hosts_file).hosts(1, 100)] == ["node1", "node2", "node13"]
    assert etchosts(hosts_file).master_name() == "master"


def test_etchosts_errors(hosts_file: Path, tmp_path: Path) -> None:
    with pytest.raises(LocaleError, match="no trailing digits.*-myId"):
        etchosts(hosts_file, hostname="storage").place()
    with pytest.raises(LocaleError, match="no host numbered 7"):
        etchosts(hosts_file).place(7)
    no_master = tmp_path / "hosts2"
    no_master.write_text("10.9.0.11 node1\n")
    with pytest.raises(LocaleError, match="no host named 'master'.*-parent"):
        etchosts(no_master, hostname="node1").place()
    with pytest.raises(LocaleError, match="cannot read"):
        etchosts(tmp_path / "absent", hostname="node1").place()


# --- static topology files ----------------------------------------------------------------

TOPOLOGY = {
    "master": {"name": "fe", "address": "10.0.0.1", "port": 7000},
    "nodes": [
        {"name": "r1", "number": 1, "address": "10.0.0.11", "parent": "fe"},
        {"name": "n2", "number": 2, "address": "10.0.0.12", "parent": "r1", "id": 1},
        {
            "name": "n3",
            "number": 3,
            "address": "10.0.0.13",
            "parent": "r1",
            "id": 2,
            "port": 7100,
            "bin_root": "/scratch",
        },
        {"name": "n4", "number": 4, "address": "10.0.0.14", "parent": "n3", "id": 1},
    ],
}

TOPOLOGY_TOML = """\
[master]
name = "fe"
address = "10.0.0.1"

[[nodes]]
name = "r1"
number = 1
address = "10.0.0.11"
parent = "fe"

[[nodes]]
name = "n2"
number = 2
address = "10.0.0.12"
parent = "r1"
id = 1
"""


def write_json(tmp_path: Path, data: object, name: str = "cluster.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_static_json(tmp_path: Path) -> None:
    path = write_json(tmp_path, TOPOLOGY)
    locale = load_locale(str(path), LocaleOptions(hostname="n3.example"))
    assert isinstance(locale, Static)
    assert (locale.master_name(), locale.master_listen()) == ("fe", ("0.0.0.0", 7000))
    assert locale.place() == Placement(
        name="n3",
        number=3,
        node_id=2,
        level=2,
        parent=("10.0.0.11", 7000),
        listen=("0.0.0.0", 7100),
        bin_root="/scratch",
    )
    n4 = locale.place(4)
    assert (n4.level, n4.parent, n4.listen) == (3, ("10.0.0.13", 7100), ("0.0.0.0", 7000))
    assert locale.place(1).parent == ("10.0.0.1", 7000)
    assert locale.hosts(2, 4) == [
        Host("n2", 2, "10.0.0.12", 2, "r1"),
        Host("n3", 3, "10.0.0.13", 2, "r1"),
        Host("n4", 4, "10.0.0.14", 3, "n3"),
    ]


def test_static_toml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(TOPOLOGY_TOML)
    locale = load_locale(str(path), LocaleOptions(cmdport=6100, my_id=2, hostname="x"))
    placed = locale.place()
    assert (placed.name, placed.node_id, placed.level) == ("n2", 1, 2)
    assert placed.parent == ("10.0.0.11", 6100)
    assert locale.place(1).node_id == 1  # id defaults to the number
    assert locale.master_listen() == ("0.0.0.0", 6100)


def test_static_cannot_find_this_node(tmp_path: Path) -> None:
    locale = load_locale(str(write_json(tmp_path, TOPOLOGY)), LocaleOptions(hostname="zz"))
    with pytest.raises(LocaleError, match="hostname 'zz'.*-myId"):
        locale.place()
    with pytest.raises(LocaleError, match="no node numbered 9"):
        locale.place(9)


def nodes_with(*changes: dict) -> dict:
    """TOPOLOGY with node entries replaced or added (keyed by position)."""
    nodes = [dict(node) for node in TOPOLOGY["nodes"]]
    for change in changes:
        index = change.pop("at", len(nodes))
        if index == len(nodes):
            nodes.append(change)
        else:
            nodes[index] = {**nodes[index], **change}
    return {"master": TOPOLOGY["master"], "nodes": nodes}


def without(index: int, key: str) -> dict:
    data = nodes_with()
    del data["nodes"][index][key]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (nodes_with({"at": 1, "parent": "r9"}), "nodes[1] ('n2'): unknown parent 'r9'"),
        (nodes_with({"at": 2, "id": 1}), "nodes[2] ('n3'): duplicate id 1 under parent 'r1'"),
        (nodes_with({"at": 2, "name": "n2"}), "nodes[2] ('n2'): duplicate name 'n2'"),
        (nodes_with({"at": 2, "name": "fe"}), "nodes[2] ('fe'): duplicate name 'fe'"),
        (nodes_with({"at": 2, "number": 2}), "nodes[2] ('n3'): duplicate number 2"),
        (without(2, "address"), "nodes[2]: missing field 'address'"),
        (without(0, "parent"), "nodes[0]: missing field 'parent'"),
        (nodes_with({"at": 0, "rack": 1}), "nodes[0]: unknown field(s) rack"),
        (nodes_with({"at": 0, "number": "1"}), "nodes[0]: field 'number' must be an integer"),
        (nodes_with({"at": 0, "number": True}), "field 'number' must be an integer"),
        (nodes_with({"at": 0, "number": 0}), "field 'number' is 0, must be 1 or more"),
        (nodes_with({"at": 0, "port": 70000}), "field 'port' is 70000, must be 1..65535"),
        (nodes_with({"at": 0, "name": ""}), "field 'name' must be a non-empty string"),
        (nodes_with({"at": 0, "parent": "n4"}), "parent cycle r1 -> n4 -> n3 -> r1"),
        (nodes_with({"at": 0, "parent": "r1", "id": 9}), "parent cycle r1 -> r1"),
        ({"nodes": []}, "top level: missing field 'master'"),
        ({"master": TOPOLOGY["master"], "nodes": {}}, "field 'nodes' must be a list"),
        ({"master": {"name": "fe"}, "nodes": []}, "master: missing field 'address'"),
        ({"master": TOPOLOGY["master"], "nodes": [3]}, "nodes[0]: must be a table/object"),
        ([], "top level: must be a table/object"),
    ],
)
def test_static_validation(tmp_path: Path, data: object, message: str) -> None:
    path = write_json(tmp_path, data)
    with pytest.raises(LocaleError) as caught:
        find_locale(str(path))
    assert str(caught.value).startswith(f"topology file {path}: ")
    assert message in str(caught.value)


def test_static_unreadable_or_unparsable(tmp_path: Path) -> None:
    with pytest.raises(LocaleError, match="cannot read topology file"):
        find_locale(str(tmp_path / "absent.json"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[master\n")
    with pytest.raises(LocaleError, match="broken.toml does not parse"):
        find_locale(str(broken))


# --- finding locales ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("kane", Kane),
        ("kf", KaneFlat),
        ("kane3", KaneRows),
        ("local", Local),
        ("etchosts", EtcHosts),
    ],
)
def test_find_builtin_by_name(name: str, cls: type[Locale]) -> None:
    assert find_locale(name) is cls
    assert cls.name == name


def test_installed_entry_points_name_the_builtins() -> None:
    points = {p.name: p.load() for p in base.entry_points(group="gproc.locales")}
    assert {name: points[name] for name in base.BUILTIN} == {
        "kane": Kane,
        "kf": KaneFlat,
        "kane3": KaneRows,
        "local": Local,
        "etchosts": EtcHosts,
    }


class Tiny(Kane):
    """A locale another package could register."""

    name = "tiny"


def test_find_through_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = [
        EntryPoint("tiny", f"{__name__}:Tiny", "gproc.locales"),
        EntryPoint("broken", "no_such_module_xyz:Locale", "gproc.locales"),
    ]
    monkeypatch.setattr(base, "entry_points", lambda group: extra)
    assert find_locale("tiny") is Tiny
    assert isinstance(load_locale("tiny", LocaleOptions(hostname="kn1")), Tiny)
    with pytest.raises(LocaleError, match="'broken'.*failed to load"):
        find_locale("broken")
    assert find_locale("kane") is Kane  # built-ins first, even without metadata


def test_unknown_locale_lists_the_known_ones() -> None:
    with pytest.raises(LocaleError) as caught:
        find_locale("kame")
    # what gproc and gproc-deploy print as one line, and old callers catch as a bad value
    assert isinstance(caught.value, GprocError) and isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert message.startswith("unknown locale 'kame': use -locale with one of ")
    for name in ("etchosts", "kane", "kf", "local", ".json", ".toml"):
        assert name in message
