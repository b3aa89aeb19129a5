"""One 80-node cluster per test run, shared by every xdist worker, always removed.

Bringing 81 containers up costs most of a minute, so ``pytest harness/`` and
``pytest -n 4 harness/`` both create exactly one cluster:

* the process that starts the run (the only one without xdist, the controller with it)
  makes a session directory and exports it; xdist workers inherit it;
* every process that runs tests registers as a user at session start, before any test
  runs (xdist collects on all workers before it hands out tests); the first test that needs
  the cluster brings it up under a file lock, the others wait on the lock and attach;
* the last user to finish takes it down, and the starting process removes whatever is left
  when it exits (a worker that crashed cannot leave the cluster behind). Ctrl-C and SIGTERM
  take the same path: SIGTERM is turned into KeyboardInterrupt.
* a host tool the images need and this host cannot install (``harness/host.py``: not root,
  no apt-get) skips every harness test with that reason, as a missing Docker engine does; it
  is kept in the shared state, so the other workers skip without trying again.

Tests that break or reconfigure the cluster (faults, the kf locale, ``-p=false``) take the
cluster exclusively (an ``flock`` write lock); the others share it (a read lock), so under
xdist a rack master is never killed under another worker's job. Exclusive tests heal the
cluster before they release it. The gproc-deploy tests hold it exclusively for their whole
module (``bare_cluster``): they need it without the harness's daemons.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from harness.checks import kill_gproc
from harness.cluster import Cluster, HarnessError, docker_client
from harness.faults import heal
from harness.host import ToolMissing
from harness.plan import KANE_SUBNET

SESSION_ENV = "GPROC_HARNESS_SESSION"
# The same default name as the CLI: only one KANE fits on 10.1.0.0/16, so a test run
# replaces a cluster left up by hand rather than failing on the taken subnet.
NAME = os.environ.get("GPROC_HARNESS_TEST_NAME", "gproc")
NODES = 80
SUBNET = os.environ.get("GPROC_HARNESS_SUBNET", KANE_SUBNET)  # see README: another /16 works
SETUP_TIMEOUT = 900  # first test: may install debootstrap, build the images, bring 81 up


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _session() -> Path:
    return Path(os.environ[SESSION_ENV])


def _update(change) -> dict:  # noqa: ANN001 - a small callback
    """Read, change and write the shared state under the session lock."""
    state_file = _session() / "state.json"
    with FileLock(str(_session() / "state.lock"), timeout=SETUP_TIMEOUT):
        state = json.loads(state_file.read_text()) if state_file.exists() else {"users": 0}
        change(state)
        state_file.write_text(json.dumps(state))
        return state


def _sigterm_is_interrupt() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def pytest_configure(config: pytest.Config) -> None:
    # test_deploy.py's tests build on each other in file order (xdist_group "deploy"); xdist's
    # plain -n N spreads a module over workers, so its default "load" becomes "loadgroup",
    # which keeps a group on one worker and spreads every other test as "load" does.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
    if not _is_worker(config) and SESSION_ENV not in os.environ:
        os.environ[SESSION_ENV] = tempfile.mkdtemp(prefix="gproc-harness-session-")
        config.stash[_owner] = True
    _sigterm_is_interrupt()


_owner = pytest.StashKey[bool]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Register as a user unless this is the xdist controller (it runs no tests)."""
    if _is_worker(session.config) or not session.config.pluginmanager.has_plugin("dsession"):
        _update(lambda s: s.update(users=s["users"] + 1))


def _down_if_up(state: dict) -> None:
    if state.get("status") == "up":
        Cluster(NAME).down(quiet=True)
        state["status"] = "down"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _is_worker(session.config) or not session.config.pluginmanager.has_plugin("dsession"):

        def leave(state: dict) -> None:
            state["users"] -= 1
            if state["users"] <= 0:
                _down_if_up(state)

        with contextlib.suppress(Exception):  # never mask the run's own outcome
            _update(leave)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The starting process removes what a crashed or killed worker left behind."""
    if config.stash.get(_owner, False):
        with contextlib.suppress(Exception):
            _update(_down_if_up)
        shutil.rmtree(_session(), ignore_errors=True)
        del os.environ[SESSION_ENV]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test pays for the images and ``up``: more than the default 120 s."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT))


@pytest.fixture(scope="session")
def cluster_handle(pytestconfig: pytest.Config) -> Cluster:
    """The run's cluster, created by whichever worker gets here first.

    What ``up`` says on stderr (a tool it installs and why, debootstrap, the image build, the
    containers) goes to the terminal as it happens, past pytest's capture: it may take minutes
    and install packages on this host, which a user must be able to see.
    """
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    uncaptured = capture.global_and_fixture_disabled if capture else contextlib.nullcontext
    try:
        client = docker_client()
    except HarnessError as error:
        pytest.skip(f"{error} (the harness tests need a Docker engine)")

    def ensure(state: dict) -> None:
        if state.get("status") in ("failed", "skipped"):
            return
        if state.get("status") != "up":
            try:
                with uncaptured():
                    Cluster(NAME, client).up(nodes=NODES, locale="kane", subnet=SUBNET)
            except ToolMissing as error:  # a host tool this host cannot install: not a failure
                state.update(status="skipped", reason=str(error))
                return
            except Exception as error:
                state.update(status="failed", reason=f"{type(error).__name__}: {error}")
                return
            state["status"] = "up"

    state = _update(ensure)
    if state["status"] == "skipped":
        pytest.skip(state["reason"])
    if state["status"] == "failed":
        pytest.fail(f"the {NODES}-node cluster did not come up: {state['reason']}")
    return Cluster(NAME, client).attach()


@contextlib.contextmanager
def _flock(kind: int) -> Iterator[None]:
    with open(_session() / "cluster.rw", "a") as f:
        fcntl.flock(f, kind)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def cluster(cluster_handle: Cluster) -> Iterator[Cluster]:
    """The kane cluster, shared with tests that leave it as they found it."""
    with _flock(fcntl.LOCK_SH):
        yield cluster_handle


@pytest.fixture
def own_cluster(cluster_handle: Cluster) -> Iterator[Cluster]:
    """The kane cluster for a test alone: it may break it; it is healed afterwards."""
    with _flock(fcntl.LOCK_EX):
        try:
            yield cluster_handle
        finally:
            if cluster_handle.require_plan().locale != "kane":
                cluster_handle.switch_locale("kane")
            cluster_handle.on_nodes(["sh", "-c", "rm -rf /tmp/xproc/* /tmp/xproc/.[!.]*"])
            heal(cluster_handle)


DEPLOY_STATE = "rm -rf /root/.local/state/gproc /root/.config/gproc /tmp/*known_hosts*"


def _forget_deploy(cluster: Cluster) -> None:
    """No trace of gproc-deploy: its daemons stopped (by itself, then by force), its files
    gone from the front-end and the nodes, so its next ``up`` is a first one."""
    cluster.exec(["gproc-deploy", "down", "--locale", "kane"], timeout=300)
    kill_gproc(cluster)
    cluster.exec(["sh", "-c", DEPLOY_STATE])
    cluster.on_nodes(["rm", "-rf", "/tmp/gproc-deploy"])


@pytest.fixture(scope="module")
def bare_cluster(cluster_handle: Cluster) -> Iterator[Cluster]:
    """The kane cluster without gproc daemons, for a module of gproc-deploy tests alone.

    The containers and sshd stay; the harness's daemons are stopped under the exclusive
    lock (no other worker's test can run meanwhile), and at the end whatever gproc-deploy
    started is stopped, every fault healed and the harness's daemons are started again.
    """
    if cluster_handle.require_plan().translated:
        pytest.skip("gproc-deploy --locale kane computes 10.1.x.y: needs the default subnet")
    with _flock(fcntl.LOCK_EX):
        cluster_handle.stop_daemons()
        try:
            _forget_deploy(cluster_handle)
            yield cluster_handle
        finally:
            heal(cluster_handle, daemons=False)
            _forget_deploy(cluster_handle)
            heal(cluster_handle)
