"""End to end on the netns backend: a 40-node cluster three levels deep, then 1,000 (``big``).

The default run brings up ``kane3`` with racks of 5 (rows of 5 racks): row masters kn1 and
kn26, rack masters every 5th node, 40 real slaves in network namespaces. It needs root and
iproute2 with network namespaces; without them every test here skips, naming what is missing.

Every test of this module runs on one xdist worker (``xdist_group``) against one cluster,
which a file lock keeps to one test session at a time on this host (two sessions would
replace each other's cluster of the same name). The 1,000-node tests carry the ``big``
marker, which the default run deselects (pyproject: ``-m 'not big'``); run them with
``pytest -m big harness/test_netns.py``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from harness.checks import Running, by_node, names
from harness.cluster import HarnessError, Result
from harness.host import ToolMissing
from harness.netns import NETNS_DIR, PREFIX, NetnsCluster, check_host, pids_in, zygote_pids
from harness.waiting import wait_until

pytestmark = [pytest.mark.xdist_group("netns"), pytest.mark.timeout(300)]

NAME = os.environ.get("GPROC_NETNS_TEST_NAME", "ntest")
NODES, RACK = 40, 5
HEARTBEAT = 2.0  # a stopped or cut node is lost after 4 silent beats: 8 s, not gproc's 20
ROOT = Path(__file__).resolve().parent.parent


def _usable() -> str | None:
    """Why this host cannot run the netns backend, or None."""
    try:
        check_host()
    except ToolMissing as error:
        return str(error)
    probe = f"{PREFIX}-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _session_lock(name: str) -> FileLock:
    return FileLock(f"/tmp/gproc-netns-test-{name}.lock", timeout=900)  # kept, as lock files are


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    why = _usable()
    if why:
        pytest.skip(why)
    with _session_lock(NAME):
        net = NetnsCluster(NAME)
        try:
            net.up(NODES, "kane3", rack_size=RACK, timeout=120, heartbeat=HEARTBEAT)
            yield net
        finally:
            net.down(quiet=True)


def gproc(net: NetnsCluster, *args: str, timeout: float = 120) -> Result:
    return net.exec(["gproc", *args], timeout=timeout)


def ran(result: Result) -> set[str]:
    return set(by_node(result))


def test_every_node_answers_its_own_hostname(cluster: NetnsCluster) -> None:
    res = gproc(cluster, "e", "././.", "/bin/hostname")
    assert res.status == 0, res.err
    assert by_node(res) == {f"kn{n}": [f"kn{n}"] for n in range(1, NODES + 1)}
    direct = cluster.exec(["hostname"], host="kn7")
    assert direct.out.strip() == "kn7"


def test_depth_specs_select_the_right_nodes(cluster: NetnsCluster) -> None:
    # row 2 is kn26..kn40: its third rack is kn40 with kn36..kn39; kn26 runs as the row picked
    res = gproc(cluster, "e", "2/3/.", "/bin/hostname")
    assert ran(res) == {"kn26", "kn40"} | names(36, 39)
    masters = {"kn1", "kn26"} | {f"kn{n}" for n in range(5, NODES + 1, 5)}
    assert ran(gproc(cluster, "e", "./.", "/bin/hostname")) == masters
    assert ran(gproc(cluster, "e", ".", "/bin/hostname")) == {"kn1", "kn26"}
    assert ran(gproc(cluster, "e", "./././.", "/bin/hostname")) == names(1, NODES)
    assert ran(gproc(cluster, "e", "1/2-3/.", "/bin/hostname")) == {"kn1"} | names(6, 15)


def test_private_mount_job_leaves_nothing_behind(cluster: NetnsCluster, tmp_path: Path) -> None:
    shipped = tmp_path / "shipped.txt"
    shipped.write_text("payload\n")
    script = (
        'r="$0/$(hostname)/xproc"; touch "$r/made-by-job"; '
        'cat "$r$1"; ls "$r" | grep -c made-by-job'
    )
    res = gproc(cluster, "e", "-f", str(shipped), "././.", "sh", "-c", script,
                str(cluster.data), str(shipped))  # fmt: skip
    assert res.status == 0, res.err
    assert by_node(res) == {f"kn{n}": ["payload", "1"] for n in range(1, NODES + 1)}
    pids = cluster.pids()
    for n in range(1, NODES + 1):
        host = f"kn{n}"
        root = Path(cluster.bin_root(host))
        stage = Path(f"{root}.stage")
        assert list(root.iterdir()) == [], f"{host} kept files in its binRoot"
        assert list(stage.iterdir()) == [], f"{host} kept a staging directory"
        mounts = Path(f"/proc/{pids[host]}/mountinfo").read_text()
        assert str(root) not in mounts, f"{host}'s daemon sees a job mount"


def test_killed_rack_master_is_reported_lost_while_the_rest_finish(cluster: NetnsCluster) -> None:
    gate = cluster.data / "gate"
    gate.touch()
    script = f"echo started; flock -s {gate} true; echo finished"  # waits until we let go
    with open(gate) as hold:
        fcntl.flock(hold, fcntl.LOCK_EX)
        job = Running(cluster, "e", "././.", "sh", "-c", script)
        try:
            wait_until(lambda: job.saying("started"), 60, "the job on all 40 nodes",
                       done=lambda seen: len(seen) == NODES)  # fmt: skip
            cluster.fault("kill", "kn35")  # rack master of kn31..kn34, under row master kn26
            wait_until(lambda: "".join(job._err), 30, "kn35's rack reported lost",
                       done=lambda err: "lost kn[31-35]" in err)  # fmt: skip
            assert job.saying("finished") == set()  # reported while the others still run
        finally:
            fcntl.flock(hold, fcntl.LOCK_UN)
        res = job.wait(60)
    assert res.status == 255, res.err
    assert job.saying("finished") == names(1, NODES) - names(31, 35)
    cluster.heal()
    tree = cluster.tree()
    assert [n for n in names(1, NODES) if tree.get(n) != "up"] == []


@pytest.mark.parametrize(("fault", "host"), [("stop", "kn10"), ("cut", "kn30")])
def test_stopped_or_cut_rack_master_is_lost_then_healed(
    cluster: NetnsCluster, fault: str, host: str
) -> None:
    cluster.fault(fault, host)
    try:
        wait_until(lambda: cluster.tree().get(host), 60, f"{host} ({fault}) seen lost",
                   done=lambda state: state != "up", interval=0.2)  # fmt: skip
        res = gproc(cluster, "e", "././.", "/bin/hostname")
        assert res.status == 255 and host in res.err, res.err
        assert host not in ran(res)
    finally:
        cluster.heal()
    tree = cluster.tree()
    assert [n for n in names(1, NODES) if tree.get(n) != "up"] == []
    assert ran(gproc(cluster, "e", "././.", "/bin/hostname")) == names(1, NODES)


def test_cli_exec_and_status_work_on_the_netns_cluster(cluster: NetnsCluster) -> None:
    cli = [sys.executable, "-m", "harness", "--name", NAME]
    out = subprocess.run([*cli, "exec", "--node", "kn12", "--", "hostname"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "kn12"), out.stderr
    status = subprocess.run([*cli, "status"], capture_output=True, text=True, cwd=ROOT)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{NODES} of {NODES} nodes up" in status.stdout


def test_down_leaves_nothing_also_after_a_crash(cluster: NetnsCluster) -> None:
    """A harness that died leaves a running cluster and maybe no state file: down by name."""
    for pid in zygote_pids(NAME):  # the zygote and its daemons keep running: "crash"
        assert Path(f"/proc/{pid}").exists()
    (cluster.dir / "cluster.json").unlink()
    spaces = [p for p in NETNS_DIR.iterdir() if p.name.startswith(f"{PREFIX}-{NAME}-")]
    inodes = {p.stat().st_ino for p in spaces}
    assert len(spaces) == NODES + 2 and pids_in(inodes)
    removed = NetnsCluster(NAME).down()
    assert removed == NODES + 2
    assert NetnsCluster(NAME).leftovers() == []
    assert pids_in(inodes) == []


def test_bad_input_is_one_line_and_status_two() -> None:
    cli = [sys.executable, "-m", "harness", "--name", "nobad"]
    for args in (["up", "--backend", "netns", "--nodes", "0"], ["up", "--backend", "bogus"],
                 ["up", "--backend", "netns", "--nodes", "85"]):  # fmt: skip
        res = subprocess.run([*cli, *args], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and "error" in res.stderr


@pytest.mark.big
def test_thousand_nodes_answer_and_a_lost_rack_is_reported() -> None:
    why = _usable()
    if why:
        pytest.skip(why)
    with _session_lock("nbig"):
        net = NetnsCluster("nbig")
        try:
            net.up(1000, "kane", timeout=600)
            res = gproc(net, "e", "./.", "/bin/hostname", timeout=300)
            assert res.status == 0, res.err[-2000:]
            assert by_node(res) == {f"kn{n}": [f"kn{n}"] for n in range(1, 1001)}
            assert ran(gproc(net, "e", "3/.", "/bin/hostname")) == names(41, 60)
            os.kill(net.pids()["kn60"], signal.SIGKILL)
            wait_until(lambda: net.tree().get("kn60"), 30, "kn60 lost in the tree",
                       done=lambda state: state != "up")  # fmt: skip
            res = gproc(net, "e", "./.", "/bin/true", timeout=300)
            assert res.status == 255 and "kn60" in res.err, res.err[-2000:]
        except HarnessError:
            raise
        finally:
            net.down(quiet=True)
        assert net.leftovers() == []


def test_without_root_or_ip_the_tests_skip_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 1000)
        assert _usable() == "the netns backend needs root (network and UTS namespaces)"
    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 0)
        m.setattr("shutil.which", lambda tool: None if tool == "nsenter" else "/usr/bin/" + tool)
        assert "'nsenter'" in (_usable() or "")
