"""gproc-deploy over real SSH: the front-end deploys to 80 nodes that run sshd and no gproc.

The deployer runs on the front-end as an operator would run it there (root, the default
identity ~/.ssh/id_ed25519 and ~/.ssh/known_hosts the harness put there), through
``docker exec``. The module's cluster has no gproc daemon (``bare_cluster``); the tests run
in file order, each bringing the tree to the state it starts from.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from harness.cluster import Cluster, Result
from harness.faults import heal, inject

from .checks import Running, by_node, gproc, gproc_processes, names
from .waiting import wait_until

# One worker runs the whole module, in file order (harness/conftest.py makes -n N group it).
pytestmark = pytest.mark.xdist_group("deploy")

UP = ("up", "1", "80", "--locale", "kane")
DOWN = ("down", "--locale", "kane")
_HOST = re.compile(r"^(kn\d+)\s+(ok|changed|failed|unreachable|skipped)\s+(.*)$")
ACCEPT = "--accept-new-host-keys"


def deploy(cluster: Cluster, *args: str) -> Result:
    """``gproc-deploy ARGS`` on the front-end; it must never end in a traceback."""
    res = cluster.exec(["gproc-deploy", *args], timeout=600)
    assert "Traceback" not in res.out + res.err, res.out + res.err
    return res


def hosts(res: Result) -> dict[str, tuple[str, str]]:
    """Host -> (state, detail) from the report, one line per host."""
    return {m[1]: (m[2], m[3]) for m in map(_HOST.match, res.lines()) if m}


def states(res: Result) -> dict[str, str]:
    return {host: state for host, (state, _) in hosts(res).items()}


def timed_up(cluster: Cluster, *extra: str) -> tuple[Result, float]:
    t = time.monotonic()
    res = deploy(cluster, *UP, *extra)
    return res, time.monotonic() - t


@pytest.fixture(scope="module")
def first_up(bare_cluster: Cluster) -> tuple[Result, float]:
    """The first ``up``: no node holds gproc yet (``bare_cluster`` wiped every trace)."""
    return timed_up(bare_cluster)


def test_up_starts_every_host(bare_cluster, first_up):
    res, _ = first_up
    assert res.status == 0, res.out + res.err
    assert hosts(res) == {
        n: ("changed", "uploaded artifact and key; started") for n in names(1, 80)
    }
    assert "artifact uploaded to 80" in res.out
    assert "recap: 0 ok, 80 changed, 0 failed, 0 unreachable, 0 skipped" in res.out
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert run.status == 0, run.err
    assert by_node(run) == {n: [n] for n in names(1, 80)}


def test_status_shows_four_racks_of_nineteen(bare_cluster, first_up):
    res = deploy(bare_cluster, "status")
    assert res.status == 0, res.err
    lines = res.lines()
    end = next(i for i, line in enumerate(lines) if " nodes below " in line)
    versions = [line for line in lines[end + 1 :] if line.startswith("kn")]
    assert len(versions) == 80 and all("(the deployed one)" in v for v in versions), versions
    rows = [line.split() for line in lines[1:end]]
    racks = {name: path for path, name, _, level, _ in rows if level == "1"}
    assert set(racks) == {"kn20", "kn40", "kn60", "kn80"}
    for rack_master, path in racks.items():
        top = int(rack_master[2:])
        below = {r[1] for r in rows if r[3] == "2" and r[0].startswith(f"{path}/")}
        assert below == names(top - 19, top - 1), rack_master
    assert all(r[4] == "up" for r in rows)
    assert lines[end] == "80 nodes below cesspool: 80 up, 0 lost"


def test_up_again_uploads_and_restarts_nothing(bare_cluster, first_up):
    _, first = first_up
    res, again = timed_up(bare_cluster)
    assert res.status == 0, res.out + res.err
    assert hosts(res) == {n: ("ok", "already running") for n in names(1, 80)}
    assert "recap: 80 ok, 0 changed, 0 failed, 0 unreachable, 0 skipped" in res.out
    assert "artifact uploaded to 0" in res.out
    assert "the master is already running" in res.out
    assert again < first / 2, f"repeat up took {again:.1f}s, the first {first:.1f}s"


def test_down_leaves_no_gproc_and_can_be_repeated(bare_cluster):
    assert deploy(bare_cluster, *UP).status == 0
    res = deploy(bare_cluster, *DOWN)
    assert res.status == 0, res.out + res.err
    assert hosts(res) == {n: ("changed", "stopped") for n in names(1, 80)}
    assert "stopped the master" in res.out
    assert gproc_processes(bare_cluster) == {}
    again = deploy(bare_cluster, *DOWN)
    assert again.status == 0, again.out + again.err
    assert hosts(again) == {n: ("ok", "not running") for n in names(1, 80)}
    assert "the master was not running" in again.out


def test_unreachable_node_and_rack_master(bare_cluster):
    """kn5's sshd is stopped: the rest of rack 1 comes up. kn40 is off the network: its 19
    nodes are SKIPPED. Either makes the exit status 1."""
    assert deploy(bare_cluster, *DOWN).status == 0
    inject(bare_cluster, "sshd-stop", "kn5")
    inject(bare_cluster, "disconnect", "kn40")
    try:
        res = deploy(bare_cluster, *UP)
    finally:
        heal(bare_cluster, daemons=False)
    assert res.status == 1, res.out + res.err
    want = {n: "changed" for n in names(1, 80)} | {n: "skipped" for n in names(21, 39)}
    assert states(res) == want | {"kn5": "unreachable", "kn40": "unreachable"}
    detail = hosts(res)
    assert detail["kn5"][1].startswith("cannot connect to 10.1.30.5:22"), detail["kn5"]
    assert detail["kn40"][1].startswith("cannot connect to 10.1.30.40:22"), detail["kn40"]
    assert detail["kn21"][1] == "not touched: its parent kn40 is unreachable"
    assert "recap: 0 ok, 59 changed, 0 failed, 2 unreachable, 19 skipped" in res.out
    rack1 = gproc(bare_cluster, "e", "1/.", "/bin/hostname")
    assert rack1.status == 0, rack1.err
    assert set(by_node(rack1)) == names(1, 20) - {"kn5"}
    assert res.lines()[-1] == "59 nodes below cesspool: 59 up, 0 lost"


def test_unknown_host_key_is_refused_until_accepted(bare_cluster):
    empty = "/tmp/empty_known_hosts"
    assert bare_cluster.exec(["sh", "-c", f": > {empty}"]).status == 0
    res = deploy(bare_cluster, *UP, "--known-hosts", empty)
    assert res.status == 1
    assert states(res) == {n: "unreachable" for n in names(1, 80)}
    for host, (_, detail) in hosts(res).items():
        assert "unknown host key" in detail and ACCEPT in detail, (host, detail)
    accepted = deploy(bare_cluster, *UP, "--known-hosts", empty, ACCEPT)
    assert accepted.status == 0, accepted.out + accepted.err
    assert set(states(accepted).values()) <= {"ok", "changed"}
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert by_node(run) == {n: [n] for n in names(1, 80)}


def test_accepted_host_keys_are_remembered(bare_cluster):
    """After ``--accept-new-host-keys`` every node's key is in the file: the next run trusts
    them all without the switch."""
    fresh = "/tmp/accepted_known_hosts"
    assert bare_cluster.exec(["sh", "-c", f": > {fresh}"]).status == 0
    assert deploy(bare_cluster, *UP, "--known-hosts", fresh, ACCEPT).status == 0
    res = deploy(bare_cluster, *UP, "--known-hosts", fresh)
    assert set(states(res).values()) <= {"ok", "changed"} and len(states(res)) == 80
    assert res.status == 0


def test_status_names_a_deployed_node_that_is_lost(bare_cluster):
    assert deploy(bare_cluster, *UP).status == 0
    inject(bare_cluster, "kill", "kn9")
    try:
        wait_until(lambda: bare_cluster.tree().get("kn9"), 60, "kn9 lost", lambda s: s == "lost")
        res = deploy(bare_cluster, "status")
        assert res.status == 1, res.out + res.err
        assert "deployed hosts not as deployed: lost: kn9" in res.err
    finally:
        heal(bare_cluster, daemons=False)
    assert deploy(bare_cluster, *UP).status == 0, "up brings kn9 back"
    assert deploy(bare_cluster, "status").status == 0
    sha = "/tmp/gproc-deploy/gproc.pyz.sha256"
    real = bare_cluster.exec(["cat", sha], host="kn7").out.strip()
    bare_cluster.exec(["sh", "-c", f"echo 0123456789abcdef > {sha}"], host="kn7")
    try:
        res = deploy(bare_cluster, "status")
        assert res.status == 1, res.out + res.err
        assert "on another artifact: kn7" in res.err
        assert f"artifact 0123456789ab, not the deployed {real[:12]}" in res.out
    finally:
        bare_cluster.exec(["sh", "-c", f"echo {real} > {sha}"], host="kn7")


def test_down_kills_only_the_daemon_it_started(bare_cluster):
    """A pid file naming another process (a recycled pid, a hand edit): left alone, said."""
    assert deploy(bare_cluster, *UP).status == 0
    stop = deploy(bare_cluster, "down", "7", "7", "--locale", "kane")
    assert hosts(stop)["kn7"] == ("changed", "stopped"), stop.out
    plant = "sleep 600 & echo $! > /tmp/gproc-deploy/slave.pid; echo $!"
    decoy = bare_cluster.exec(["sh", "-c", plant], host="kn7").out.strip()
    try:
        res = deploy(bare_cluster, "down", "7", "7", "--locale", "kane")
        state, detail = hosts(res)["kn7"]
        assert state == "ok" and f"names pid {decoy}, which is not this daemon" in detail
        alive = bare_cluster.exec(["kill", "-0", decoy], host="kn7")
        assert alive.status == 0, "the sleep was not killed"
    finally:
        bare_cluster.exec(["kill", decoy], host="kn7")
    assert deploy(bare_cluster, *UP).status == 0


def test_two_runs_at_once_leave_one_daemon_per_node(bare_cluster):
    assert deploy(bare_cluster, *DOWN).status == 0
    front = bare_cluster.container_name(bare_cluster.require_plan().front_end)
    cmd = ["docker", "exec", front, "gproc-deploy", *UP, "--lock-wait", "300"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    assert any("waiting up to 300s for another gproc-deploy run" in out for out, _ in outs)
    daemons = gproc_processes(bare_cluster)
    assert {n: len(p) for n, p in daemons.items() if n != "cesspool"} == {
        n: 1 for n in names(1, 80)
    }, daemons
    pids = bare_cluster.on_nodes(["cut", "-d", " ", "-f1", "/tmp/gproc-deploy/slave.pid"])
    assert {n: r.out.strip() for n, r in pids.items()} == {
        n: daemons[n][0].split()[0] for n in names(1, 80)
    }, "each pid file names its node's one daemon"


def test_a_new_key_restarts_every_daemon_and_is_not_an_artifact_upload(bare_cluster):
    assert deploy(bare_cluster, *UP).status == 0
    new_key = "/tmp/rotated.key"
    bare_cluster.exec(["sh", "-c", f"rm -f {new_key} && gproc k -key {new_key}"])
    try:
        res = deploy(bare_cluster, *UP, "--key", new_key)
        assert res.status == 0, res.out + res.err
        assert "artifact uploaded to 0" in res.out, "only the key travels"
        assert "restarted the master" in res.out
        details = {detail.split(";")[0] for _, detail in hosts(res).values()}
        assert details == {"uploaded key"}, details
        assert set(states(res).values()) == {"changed"}
        run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
        assert by_node(run) == {n: [n] for n in names(1, 80)}, "every node joined on the new key"
    finally:
        assert deploy(bare_cluster, *UP).status == 0, "back to the default key"


def test_check_says_what_up_then_does(bare_cluster):
    assert deploy(bare_cluster, *UP).status == 0
    assert deploy(bare_cluster, "down", "1", "3", "--locale", "kane").status == 0
    check = deploy(bare_cluster, *UP, "--check")
    assert check.status == 0, check.out + check.err
    assert "check (nothing was changed)" in check.out and "would leave the master" in check.out
    assert not {"kn1", "kn2", "kn3"} & set(gproc_processes(bare_cluster)), "nothing started"
    want = {n: ("ok", "already running") for n in names(4, 80)}
    assert hosts(check) == want | {n: ("changed", "started") for n in ("kn1", "kn2", "kn3")}
    up = deploy(bare_cluster, *UP)
    assert up.status == 0, up.out + up.err
    assert hosts(up) == hosts(check), "up did exactly what check said"


SITE2 = "/tmp/gproc-site2"
DIGEST = "cat /tmp/gproc-deploy/gproc.pyz.sha256"


def changed_tree(cluster: Cluster) -> None:
    """A second artifact: the front-end's gproc with one line added."""
    copy = f"rm -rf {SITE2} && cp -r /opt/gproc/site {SITE2}"
    make = f"{copy} && echo '# v2' >> {SITE2}/gproc/__init__.py"
    assert cluster.exec(["sh", "-c", make]).status == 0


def deployer_from(site: str) -> str:
    """gproc-deploy's main from the code in ``site`` (as the front-end's wrapper does)."""
    return (
        f"import sys; sys.path.insert(0, {site!r}); "
        "from gproc.deploy.cli import main; sys.exit(main())"
    )


def digests(cluster: Cluster) -> set[str]:
    return {r.out.strip() for r in cluster.on_nodes(["sh", "-c", DIGEST]).values()}


class Deploying:
    """gproc-deploy running on the front-end (from ``site``), read line by line."""

    def __init__(self, cluster: Cluster, site: str, *args: str):
        front = cluster.container_name(cluster.require_plan().front_end)
        cmd = ["docker", "exec", front, "python3", "-c", deployer_from(site), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []

    def until(self, text: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"gproc-deploy ended before saying {text!r}:\n{''.join(self.lines)}")

    def finish(self) -> Result:
        rest, _ = self.proc.communicate(timeout=900)
        out = "".join(self.lines) + rest
        assert "Traceback" not in out, out
        return Result(self.proc.returncode, out, "")


def test_a_rolling_upgrade_keeps_the_tree_serving(bare_cluster):
    """A second artifact, rack by rack then the master, while jobs run: the jobs on racks
    outside the batch finish with 0, a drained rack refuses new jobs saying why, every node
    ends on the new artifact, the master too, and no rack is lost."""
    assert deploy(bare_cluster, *UP).status == 0
    before = digests(bare_cluster)
    changed_tree(bare_cluster)
    rack4 = Running(bare_cluster, "e", "4/.", "/bin/sh", "-c", "echo started; sleep 20; echo done")
    rack1 = Running(bare_cluster, "e", "1/.", "/bin/sh", "-c", "echo started; sleep 8; echo done")
    wait_until(lambda: rack4.saying("started") | rack1.saying("started"), 120, "both jobs",
               lambda s: s == names(1, 20) | names(61, 80))  # fmt: skip
    rolling = Deploying(bare_cluster, SITE2, *UP, "--drain-timeout", "120")
    rolling.until("rolling: kn[1-20]: drained")
    refused = gproc(bare_cluster, "e", "1/.", "/bin/true")
    assert refused.status == 1 and "draining: gproc-deploy is upgrading it" in refused.err
    res = rolling.finish()
    assert res.status == 0, res.out
    for job in (rack1, rack4):
        done = job.wait(300)
        assert done.status == 0, done.err
        assert by_node(done) and all(v == ["started", "done"] for v in by_node(done).values())
    after = digests(bare_cluster)
    assert len(after) == 1 and after != before, "every node on the new artifact"
    master = " ".join(gproc_processes(bare_cluster)["cesspool"])
    assert after.pop() in master, "the master runs the new artifact too"
    assert "rolling: the master" in res.out and "rolling: done" in res.out
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert by_node(run) == {n: [n] for n in names(1, 80)}, "no rack lost"


def test_rollback_returns_to_the_previous_artifact(bare_cluster):
    now = digests(bare_cluster)
    res = deploy(bare_cluster, "rollback", "--locale", "kane")
    assert res.status == 0, res.out + res.err
    assert "artifact uploaded to 0" in res.out, "the previous one was kept on the nodes"
    assert {d.split(";")[0] for _, d in hosts(res).values()} == {
        "restored previous artifact (kept there)"
    }
    back = digests(bare_cluster)
    assert len(back) == 1 and back != now
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert by_node(run) == {n: [n] for n in names(1, 80)}
    again = deploy(bare_cluster, *UP)
    assert set(states(again).values()) == {"ok"}, "this code's artifact is the current one"


def test_retry_failed_touches_only_what_failed(bare_cluster):
    assert deploy(bare_cluster, *DOWN).status == 0
    inject(bare_cluster, "sshd-stop", "kn5")
    try:
        first = deploy(bare_cluster, *UP)
        assert states(first)["kn5"] == "unreachable" and first.status == 1
    finally:
        heal(bare_cluster, daemons=False)
    retry = deploy(bare_cluster, *UP, "--retry-failed")
    assert retry.status == 0, retry.out + retry.err
    assert hosts(retry) == {"kn5": ("changed", "started")}
    run = gproc(bare_cluster, "e", "./.", "/bin/hostname")
    assert by_node(run) == {n: [n] for n in names(1, 80)}


def test_host_keys_are_matched_by_name_as_ssh_does(bare_cluster):
    """A known_hosts file that names the nodes without their addresses trusts them."""
    names_only = "/tmp/names_known_hosts"
    strip = f"sed -E 's/^(kn[0-9]+),[0-9.]+ /\\1 /' /root/.ssh/known_hosts > {names_only}"
    assert bare_cluster.exec(["sh", "-c", strip]).status == 0
    assert "10.1.30." not in bare_cluster.exec(["cat", names_only]).out
    res = deploy(bare_cluster, *UP, "--known-hosts", names_only)
    assert res.status == 0, res.out + res.err
    assert set(states(res).values()) <= {"ok", "changed"} and len(states(res)) == 80
