"""Deploying gproc to real nodes over SSH and bringing the tree up level by level.

What the original's copytokane.sh and startkane did: build the artifact (a zipapp needing
only python3), copy it and the cluster key to the nodes (skipping nodes that already hold the
same hash), start the master here on the front-end, then start the first tree level (on KANE
the rack masters), wait until they have registered with the master, then the next level.
Every host ends as ok (nothing to do), changed (what), failed (with the reason), unreachable
or skipped (not touched, and why), then a recap counts them; a daemon that already runs the
same artifact is left alone, and a daemon is stopped only if it is the one gproc-deploy
started (its pid and start time, from the pid file the daemon writes itself).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from gproc.client import ClientError, drain
from gproc.errors import GprocError
from gproc.locales import Host, Locale
from gproc.nodespec import fold
from gproc.progress import Bar

from .artifact import build_zipapp
from .daemons import LocalDaemons, live_nodes, orphans, wait_registered
from .remote import Failed, Remote, SshOptions, Unreachable

# What a host ends as, as Ansible's recap says it: nothing to do, changed (and what), failed
# (reached, a step failed), unreachable (SSH), skipped (not touched, and why).
OK, CHANGED, FAILED, UNREACHABLE, SKIPPED = "ok", "changed", "failed", "unreachable", "skipped"
STATES = (OK, CHANGED, FAILED, UNREACHABLE, SKIPPED)
GOOD = frozenset({OK, CHANGED})

Say = Callable[[str], None]


@dataclass
class Result:
    state: str = OK
    detail: str = ""

    def then(self, later: Result) -> Result:
        """This host's result after a later phase: a failure stays; changes add up."""
        if self.state not in GOOD or later.state not in GOOD:
            return self if self.state not in GOOD else later
        if self.state == CHANGED and later.state == CHANGED:
            return Result(CHANGED, f"{self.detail}; {later.detail}")
        return self if self.state == CHANGED else later


@dataclass
class Settings:
    """Where and how the tree runs; the switches of ``gproc-deploy`` for SSH locales."""

    locale: str
    cmdport: int = 6666
    uds: str = "/tmp/g"
    key: str = ""
    parent: str | None = None
    bin_root: str | None = None
    debug: int = 1
    allow: str = "owner"  # gproc m -allow
    check: bool = False  # --check: say what up would do, change nothing
    serial: int = 1  # --serial: racks restarted at once in a rolling upgrade (0: all at once)
    max_fail: int = 0  # --max-fail: failed hosts a batch may have before the rollout stops
    drain_timeout: float = 60.0  # --drain-timeout: seconds running jobs get before a restart
    reconnect: float = 120.0  # gproc s -reconnect: how long a node waits for a restarting parent
    parallel: int = 32
    register_timeout: float = 60.0
    ssh: SshOptions = field(default_factory=SshOptions)


class Progress:
    """Hosts done of one phase: a bar on a terminal (gproc.progress), else a line every ten
    hosts and at the end, so 80 hosts stay readable in a log."""

    def __init__(self, phase: str, total: int, out: TextIO | None = None):
        self.phase, self.total = phase, total
        self.out = out or sys.stderr
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.bar = Bar(
            phase,
            total,
            self.out,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def tick(self, result: Result) -> None:
        with self.lock:
            self.counts[result.state] = self.counts.get(result.state, 0) + 1
            done = sum(self.counts.values())
            parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
            if self.bar.shown:
                self.bar.advance(1, note=parts)
                if done == self.total:
                    self.bar.close()
            elif done == self.total or done % 10 == 0:
                self.out.write(f"{self.phase}: {done}/{self.total} ({parts})\n")
                self.out.flush()


class SshDeployer:
    def __init__(self, locale: Locale, settings: Settings, state: Path, say: Say | None = None):
        self.locale = locale
        self.s = settings
        self.state = state
        self.say = say or (lambda line: print(line, flush=True))  # lines as they happen
        self.daemons = LocalDaemons(state)
        self.results: dict[str, Result] = {}
        self.uploaded = 0
        self.digest = ""  # the artifact's
        self.fingerprint = ""  # artifact, key and daemon settings: a change restarts
        self.key_digest = ""  # a new key restarts the whole tree at once, not rolling
        self.master_restarts = False  # --check: the master would restart (nodes start anew)
        self.pyz: Path | None = None  # the artifact deployed (the master runs it)
        self.refused = 0.0  # rolling: the longest any node refused new jobs, in seconds
        self.undrainable = False  # the running master does not know how to drain
        self.lock = threading.Lock()
        self.seconds: dict[str, float] = {}  # SSH time per host, over every phase

    @property
    def remote_dir(self) -> str:
        return self.s.ssh.remote_dir

    @property
    def topology(self) -> Path | None:
        """A static topology file travels to the nodes with the artifact."""
        name = self.s.locale
        return Path(name) if name.endswith((".json", ".toml")) else None

    @property
    def remote_locale(self) -> str:
        if self.topology is None:
            return self.s.locale
        return f"{self.remote_dir}/topology{self.topology.suffix}"

    # ------------------------------------------------------------ plan

    def plan(self, low: int, high: int) -> list[Host]:
        return sorted(self.locale.hosts(low, high), key=lambda h: (h.level, h.number))

    def describe(self, hosts: list[Host], action: str) -> str:
        """The dry-run plan: what would happen, level by level, touching nothing."""
        lines = [f"{action} {len(hosts)} hosts (dry run: nothing is touched)"]
        if action == "up":
            lines.append(
                f"  build the artifact; copy it and the key to {self.remote_dir} "
                "on each host that lacks them"
            )
            lines.append(f"  start the master here: {shlex.join(self.master_argv())}")
        for level in sorted({h.level for h in hosts}):
            names = [h.name for h in hosts if h.level == level]
            verb = "start, then wait for registration:" if action == "up" else "stop:"
            lines.append(f"  level {level} ({len(names)}): {verb} {fold(names)}")
        if action == "down":
            lines.append("  then stop the master here, if the whole tree was named")
        return "\n".join(lines)

    # ------------------------------------------------------------ phases

    def each(
        self, phase: str, hosts: Iterable[Host], work: Callable[[Remote, Host], Result]
    ) -> None:
        """Run ``work`` on every host over a bounded pool of SSH connections."""
        hosts = list(hosts)
        if not hosts:
            return
        progress = Progress(phase, len(hosts))

        def one(host: Host) -> None:
            t = time.monotonic()
            try:
                with Remote(host.name, host.address, self.s.ssh) as remote:
                    result = work(remote, host)
            except Unreachable as e:
                result = Result(UNREACHABLE, str(e))
            except Failed as e:
                result = Result(FAILED, str(e))
            with self.lock:
                before = self.results.get(host.name)
                self.results[host.name] = before.then(result) if before else result
            self.seconds[host.name] = self.seconds.get(host.name, 0.0) + time.monotonic() - t
            progress.tick(result)

        with ThreadPoolExecutor(max_workers=max(1, self.s.parallel)) as pool:
            list(pool.map(one, hosts))

    # ------------------------------------------------------------ artifacts kept here

    @property
    def artifacts(self) -> Path:
        return self.state / "artifacts"

    def _kept(self, which: str) -> str:
        path = self.state / which
        return path.read_text().strip() if path.exists() else ""

    def artifact(self, rollback: bool) -> tuple[Path, str]:
        """The artifact to deploy: built from this code, or (rollback) the one before.

        Every artifact deployed is kept by its hash with the names of the current and the
        previous one, so the master runs it too and a rollback has it at hand.
        """
        if rollback:
            digest = self._kept("previous")
            pyz = self.artifacts / digest / "gproc.pyz"
            if not digest or not pyz.exists():
                raise GprocError(
                    f"no previous artifact in {self.artifacts}: nothing to roll back to"
                )
            return pyz, digest
        built, digest = build_zipapp(self.state / "gproc.pyz")
        pyz = self.artifacts / digest / "gproc.pyz"  # named so, it is gproc's to anyone looking
        if not pyz.exists():
            pyz.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, pyz)
        return pyz, digest

    def adopt(self, digest: str) -> None:
        """``digest`` is now the current artifact; the one it replaces is the previous."""
        current = self._kept("current")
        if current != digest:
            (self.state / "previous").write_text(current + "\n")
            (self.state / "current").write_text(digest + "\n")
        keep = {digest, current, self._kept("previous")}
        for old in self.artifacts.glob("*/gproc.pyz"):
            if old.parent.name not in keep:
                shutil.rmtree(old.parent, ignore_errors=True)

    def copy(self, hosts: list[Host], rollback: bool = False) -> None:
        pyz, digest = self.artifact(rollback)
        key = Path(self.s.key)
        secret = (
            key.read_bytes() if key.exists() or not self.s.check else b""
        )  # --check: made later
        if self.topology is not None:  # the topology travels too: part of what must match
            secret += self.topology.read_bytes()
        key_digest = hashlib.sha256(secret).hexdigest()
        self.say(f"artifact {pyz} sha256 {digest[:16]}")

        def copy_one(remote: Remote, host: Host) -> Result:
            d = self.remote_dir
            have = remote.run(
                f"mkdir -p -m 700 {d} && cd {d} && for f in gproc.pyz.sha256 key.sha256 "
                f'gproc.pyz.prev.sha256; do echo "$(cat $f 2>/dev/null)"; done'
            ).splitlines()
            new_artifact = have[:1] != [digest]
            new_key = have[1:2] != [key_digest]
            restore = new_artifact and have[2:3] == [digest]  # the previous one is there
            if not new_artifact and not new_key:
                return Result(OK, "artifact and key already there")
            what = " and ".join(
                w for w, new in (("artifact", new_artifact), ("key", new_key)) if new
            )
            if restore:
                what = what.replace("artifact", "previous artifact (kept there)")
            if self.s.check:
                with self.lock:
                    self.uploaded += new_artifact and not restore
                return Result(CHANGED, f"{'restored' if restore else 'uploaded'} {what}")
            if restore:
                remote.run(SWAP.format(d=d))
            elif new_artifact:  # the one it replaces is kept, for a rollback
                remote.run(f"cd {d} && if [ -f gproc.pyz ]; then {KEEP}; fi")
                remote.upload(pyz, f"{d}/gproc.pyz", 0o755)
                remote.run(f"echo {digest} > {d}/gproc.pyz.sha256")
                with self.lock:
                    self.uploaded += 1
            if new_key:  # a key alone travels alone: the artifact is not sent again
                remote.upload(key, f"{d}/cluster.key", 0o600)
                if self.topology is not None:
                    remote.upload(self.topology, self.remote_locale, 0o644)
                remote.run(f"echo {key_digest} > {d}/key.sha256")
            return Result(CHANGED, f"{'restored' if restore else 'uploaded'} {what}")

        self.each("copy", hosts, copy_one)
        self.digest = digest
        self.key_digest = key_digest
        self.pyz = pyz
        settings = shlex.join(self._switches("KEY", self.remote_locale))
        self.fingerprint = hashlib.sha256(f"{digest} {key_digest} {settings}".encode()).hexdigest()

    def master_change(self) -> tuple[bool, bool]:
        """(running, restart): whether the master runs, and whether it must restart because
        it runs another artifact, key or settings."""
        mark = self.state / "master.sha256"
        old = mark.read_text().strip() if mark.exists() else ""
        running = self.daemons.pid("master") is not None
        return running, running and old != self._master_mark()

    def _master_mark(self) -> str:
        argv = shlex.join(self.master_argv())
        return hashlib.sha256(f"{self.fingerprint} {argv}".encode()).hexdigest()

    def start_master(self, hosts: list[Host]) -> None:
        """Start the master, or restart it when it runs another artifact, key or settings.

        Before a restart the nodes are stopped, leaves first (they would follow their
        parent down anyway); the levels then start them on the new master.
        """
        running, restart = self.master_change()
        if self.s.check:
            verb = "restart" if restart else "leave" if running else "start"
            self.say(f"would {verb} the master")
            self.master_restarts = restart
            return
        argv = self.master_argv()
        if restart:
            self.stop_hosts(hosts, record=False)
            self.daemons.stop(["master"])
        if self.daemons.start_master(argv, self.s.uds, self.s.cmdport, 30):
            verb = "restarted" if restart else "started"
            self.say(f"{verb} the master (log {self.state / 'master.log'})")
        else:
            self.say("the master is already running")
        (self.state / "master.sha256").write_text(self._master_mark() + "\n")

    def master_argv(self) -> list[str]:
        """The master runs the deployed artifact too, so it is upgraded (and rolled back)
        with the nodes."""
        switches = self._switches(self.s.key, self.s.locale)
        uds = ["-defaultMasterUDS", self.s.uds, "-allow", self.s.allow]
        code = [str(self.pyz)] if self.pyz else ["-m", "gproc"]
        return [sys.executable, *code, *switches, *uds, "m"]

    def _switches(self, key: str, locale: str) -> list[str]:
        s = self.s
        argv = ["-locale", locale, "-cmdport", str(s.cmdport), "-key", key, "-debug", str(s.debug)]
        argv += ["-reconnect", f"{s.reconnect:g}"]  # the master may restart under the nodes
        if s.parent:
            argv += ["-parent", s.parent]
        if s.bin_root:
            argv += ["-binRoot", s.bin_root]
        return argv

    def start_levels(self, hosts: list[Host]) -> None:
        """Start level by level; a level's hosts whose parent failed are SKIPPED."""
        lonely = orphans(hosts, self.locale.master_name(), live_nodes(self.s.uds) or set())
        for name, parent in lonely.items():
            self.results[name] = Result(
                SKIPPED, f"not touched: its parent {parent} is neither in this range nor running"
            )
        for level in sorted({h.level for h in hosts}):
            here = [h for h in hosts if h.level == level]
            runnable = []
            for h in here:
                if self.results.get(h.name, Result()).state not in GOOD:
                    continue
                parent = self.results.get(h.parent)
                if parent is not None and parent.state not in GOOD:
                    self.results[h.name] = Result(
                        SKIPPED, f"not touched: its parent {h.parent} is {parent.state}"
                    )
                else:
                    runnable.append(h)
            self.each(f"start level {level}", runnable, self._start_slave)
            if self.s.check:
                continue
            started = [h.name for h in runnable if self.results[h.name].state in GOOD]
            late = wait_registered(self.s.uds, started, self.s.register_timeout)
            for name in late:
                self.results[name] = Result(
                    FAILED,
                    f"did not register within "
                    f"{self.s.register_timeout:.0f}s; see "
                    f"{self.remote_dir}/slave.log there",
                )
            live = live_nodes(self.s.uds) or set()
            up = sum(h.name in live for h in here)
            self.say(f"level {level}: {up} of {len(here)} registered with the master")
        live = live_nodes(self.s.uds) or set()
        for name, result in self.results.items():
            if result.state == SKIPPED and name in live:
                result.detail += " (its daemon runs: it is up in the tree)"

    def _start_slave(self, remote: Remote, host: Host) -> Result:
        d = self.remote_dir
        switches = self._switches(f"{d}/cluster.key", self.remote_locale)
        argv = ["python3", f"{d}/gproc.pyz", *switches, "-myId", str(host.number)]
        argv += ["-pidfile", f"{d}/slave.pid", "s"]
        if self.s.check:
            if self.master_restarts:
                return Result(CHANGED, "started")  # stopped first, with the master
            said = remote.run(OURS + CHECK.format(d=d, digest=self.fingerprint)).strip()
        else:
            script = OURS + START.format(d=d, digest=self.fingerprint, argv=shlex.join(argv))
            said = remote.run(script).strip() or "started"
        return Result(OK if said == "already running" else CHANGED, said)

    def stop_hosts(self, hosts: list[Host], record: bool = True) -> None:
        """Stop the daemons, leaves first, so their parents' going does not look like a
        failure in their logs. ``record=False``: a step of a restart, not a result."""

        def stop(remote: Remote, _host: Host) -> Result:
            said = remote.run(OURS + STOP.format(d=self.remote_dir)).strip()
            return Result(CHANGED if said == "stopped" else OK, said)

        before = dict(self.results)
        for level in sorted({h.level for h in hosts}, reverse=True):
            self.each(f"stop level {level}", [h for h in hosts if h.level == level], stop)
        if not record:  # only failures to reach a host count
            for name, result in list(self.results.items()):
                if result.state in GOOD:
                    self.results[name] = before.get(name, Result(OK, ""))

    # ------------------------------------------------------------ commands

    def up(self, low: int, high: int, only: set[str] | None = None, rollback: bool = False) -> bool:
        """Copy, start the master, start the levels; ``only`` (--retry-failed) limits the
        hosts, ``rollback`` deploys the previous artifact instead of this code's."""
        hosts = [h for h in self.plan(low, high) if only is None or h.name in only]
        t = time.monotonic()
        self.copy(hosts, rollback)
        running, restart = self.master_change()
        new_key = self._kept("key") not in ("", self.key_digest)  # one tree cannot mix keys
        if running and restart and self.s.serial > 0 and not self.s.check and not new_key:
            self.rolling(hosts)
        else:
            self.start_master(hosts)
            self.start_levels(hosts)
        if not self.s.check:
            (self.state / "key").write_text(self.key_digest + "\n")
        if not self.s.check:
            self.adopt(self.digest)
            self.remember(hosts)
        slowest = max(self.seconds, key=self.seconds.__getitem__, default="-")
        verb = "check (nothing was changed)" if self.s.check else "up"
        uploaded = "would go" if self.s.check else "uploaded"
        self.say(
            f"{verb}: {len(hosts)} hosts in {time.monotonic() - t:.1f}s, artifact {uploaded} "
            f"to {self.uploaded}; slowest host {slowest} "
            f"({self.seconds.get(slowest, 0.0):.1f}s over SSH)"
        )
        return self.report(hosts)

    def down(self, hosts: list[Host], master_too: bool) -> bool:
        self.stop_hosts(hosts)
        if master_too:
            stopped = self.daemons.stop(["master"])
            self.say("stopped the master" if stopped else "the master was not running")
        return self.report(hosts)

    # ------------------------------------------------------------ rolling upgrades

    def rolling(self, hosts: list[Host]) -> None:
        """Restart a tree that runs another artifact, key or settings without taking it down.

        Racks (a first-level node and everything below it), ``--serial`` at a time: drained
        (new jobs leave them out, saying why; running ones get ``--drain-timeout``), stopped,
        started on the new artifact and gated (each node registered, its pid file its own)
        before the next batch. Then the master: drained, restarted, and the racks, started
        with ``-reconnect``, register with it again. Jobs on the other racks run on.
        """
        below = self._subtrees(hosts)
        inside = {h.name for h in hosts}
        racks = [h for h in hosts if h.parent not in inside]  # the tops of what is deployed
        for start in range(0, len(racks), self.s.serial):
            batch = [m for r in racks[start : start + self.s.serial] for m in below[r.name]]
            names = [h.name for h in batch]
            t = time.monotonic()
            self._drain(names, f"rolling: {fold(names)}")
            self.stop_hosts(batch, record=False)
            self.start_levels(batch)
            self._ask(names, False)
            self.refused = max(self.refused, time.monotonic() - t)
            bad = [n for n in names if self.results[n].state not in GOOD]
            if len(bad) > self.s.max_fail:
                self.say(f"rolling: stopped, {len(bad)} failed (--max-fail {self.s.max_fail})")
                for h in hosts:
                    self.results.setdefault(h.name, Result(SKIPPED, "not touched: rollout stopped"))
                return
        names = [h.name for h in hosts]
        t = time.monotonic()
        self._drain(names, "rolling: the master")
        self.daemons.stop(["master"])
        self.start_master(hosts)
        late = wait_registered(self.s.uds, names, self.s.register_timeout)
        for name in late:
            self.results[name] = Result(FAILED, "did not register again with the new master")
        self.refused = max(self.refused, time.monotonic() - t)
        self.say(f"rolling: done; the longest any node refused new jobs: {self.refused:.1f}s")

    def _drain(self, names: list[str], what: str) -> None:
        """New jobs leave ``names`` out (said once the master has it); wait up to
        --drain-timeout for the running ones."""
        deadline = time.monotonic() + self.s.drain_timeout
        busy = self._ask(names, True)
        self.say(f"{what}: drained, {len(busy)} jobs still running there")
        while busy := self._ask(names, True):
            if time.monotonic() >= deadline:
                self.say(f"rolling: {len(busy)} jobs still running after the drain; restarting")
                return
            time.sleep(0.2)

    def _ask(self, names: list[str], on: bool) -> list[str]:
        """Drain (or release) nodes at the master; a master too old to drain is said, once."""
        try:
            return drain(self.s.uds, names, on)
        except (ClientError, OSError) as e:
            if not self.undrainable:
                self.say(f"rolling: the master cannot drain nodes ({e}); going on without")
                self.undrainable = True
            return []

    @staticmethod
    def _subtrees(hosts: list[Host]) -> dict[str, list[Host]]:
        """Each host and every host below it, parents first."""
        below: dict[str, list[Host]] = {h.name: [h] for h in hosts}
        for h in sorted(hosts, key=lambda h: -h.level):
            if h.parent in below:
                below[h.parent].extend(below[h.name])
        return {n: sorted(m, key=lambda h: (h.level, h.number)) for n, m in below.items()}

    def current_artifact(self) -> str:
        """The hash of the artifact the last run deployed ("" when none)."""
        return self._kept("current")

    def artifacts_held(self, hosts: list[Host]) -> dict[str, Result]:
        """Each host's artifact hash (as the detail of an ok), or why it is unknown."""
        d = self.remote_dir

        def read(remote: Remote, _host: Host) -> Result:
            return Result(OK, remote.run(f"cat {d}/gproc.pyz.sha256 2>/dev/null; true").strip())

        self.results = {}
        self.each("artifacts", hosts, read)
        return dict(self.results)

    def remember(self, hosts: list[Host]) -> None:
        """Each host's outcome, for --retry-failed."""
        path = self.state / "results.json"
        try:
            last = json.loads(path.read_text())
        except (OSError, ValueError):
            last = {}
        last.update({h.name: self.results.get(h.name, Result(SKIPPED)).state for h in hosts})
        path.write_text(json.dumps(last))

    def failed_last_time(self) -> set[str]:
        try:
            last = json.loads((self.state / "results.json").read_text())
        except (OSError, ValueError):
            return set()
        return {name for name, state in last.items() if state not in GOOD}

    def report(self, hosts: list[Host]) -> bool:
        """One line per host, then the recap; True when every host is ok or changed."""
        width = max((len(h.name) for h in hosts), default=4)
        final = {h.name: self.results.get(h.name, Result(SKIPPED, "not attempted")) for h in hosts}
        for h in sorted(hosts, key=lambda h: h.number):
            r = final[h.name]
            self.say(f"{h.name:<{width}}  {r.state:<11}  {r.detail}")
        counts = {state: 0 for state in STATES}
        for r in final.values():
            counts[r.state] += 1
        self.say("recap: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
        return all(r.state in GOOD for r in final.values())


# ours: slave.pid ("PID START", written by the daemon itself, gproc.pidfile) names a live
# process with that start time (field 22 of /proc/PID/stat) running gproc.pyz: this daemon,
# not whatever process now holds a recycled pid. Sets $pid.
OURS = """\
ours() {
    [ -s slave.pid ] || return 1
    read -r pid start < slave.pid || true
    [ -n "$pid" ] && [ -n "$start" ] || return 1
    now=$(cut -d')' -f2- "/proc/$pid/stat" 2>/dev/null | awk '{print $20}')
    [ "$now" = "$start" ] && grep -q gproc.pyz "/proc/$pid/cmdline" 2>/dev/null
}
halt() {
    kill "$pid" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25; do
        kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}
"""

# Verified: "started" only once the new daemon has written its own pid file (it serves);
# registration is checked by the deployer with the master.
START = """\
set -e
cd {d}
restarted=""
if ours; then
    if [ "$(cat slave.sha256 2>/dev/null)" = "{digest}" ]; then
        echo "already running"; exit 0
    fi
    halt; restarted=1
fi
rm -f slave.pid
setsid {argv} >> {d}/slave.log 2>&1 < /dev/null &
child=$!
tries=0
until [ -s slave.pid ]; do
    if ! kill -0 "$child" 2>/dev/null; then
        echo "the daemon exited at once: $(tail -n 1 slave.log)" >&2; exit 1
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then echo "no pid file after 30s; see {d}/slave.log" >&2; exit 1; fi
    sleep 0.1
done
echo {digest} > slave.sha256
if [ -n "$restarted" ]; then echo "restarted (another artifact, key or settings ran)"
else echo started; fi
"""

# Keep the artifact in place as the previous one; bring the previous one back (rollback).
KEEP = "mv -f gproc.pyz gproc.pyz.prev && mv -f gproc.pyz.sha256 gproc.pyz.prev.sha256"
SWAP = """\
cd {d}
mv -f gproc.pyz gproc.pyz.swap && mv -f gproc.pyz.sha256 gproc.pyz.swap.sha256
mv -f gproc.pyz.prev gproc.pyz && mv -f gproc.pyz.prev.sha256 gproc.pyz.sha256
mv -f gproc.pyz.swap gproc.pyz.prev && mv -f gproc.pyz.swap.sha256 gproc.pyz.prev.sha256
"""

# What START would say, doing nothing (--check).
CHECK = """\
cd {d} 2>/dev/null || {{ echo started; exit 0; }}
if ours; then
    if [ "$(cat slave.sha256 2>/dev/null)" = "{digest}" ]; then echo "already running"
    else echo "restarted (another artifact, key or settings ran)"; fi
else
    echo started
fi
"""

STOP = """\
cd {d} 2>/dev/null || {{ echo "not running"; exit 0; }}
if ours; then
    halt; rm -f slave.pid; echo stopped
elif [ -s slave.pid ]; then
    other=$(cut -d' ' -f1 slave.pid)
    echo "not running (slave.pid names pid $other, which is not this daemon: left alone)"
    rm -f slave.pid
else
    echo "not running"
fi
"""
