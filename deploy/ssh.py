"""Deploying gproc to real nodes over SSH and bringing the tree up level by level.

What the original's copytokane.sh and startkane did: build the artifact (a zipapp needing
only python3), copy it and the cluster key to the nodes (skipping nodes that already hold the
same hash), start the master here on the front-end, then start the first tree level (on KANE
the rack masters), wait until they have registered with the master, then the next level.
Every host ends as ok, UNREACHABLE, FAILED (with the reason) or SKIPPED (its parent failed),
and a daemon that already runs the same artifact is left alone.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from gproc.locales import Host, Locale
from gproc.nodespec import fold
from gproc.progress import Bar

from .artifact import build_zipapp
from .daemons import LocalDaemons, live_nodes, orphans, wait_registered
from .remote import Failed, Remote, SshOptions, Unreachable

OK, UNREACHABLE, FAILED, SKIPPED = "ok", "UNREACHABLE", "FAILED", "SKIPPED"

Say = Callable[[str], None]


@dataclass
class Result:
    state: str = OK
    detail: str = ""


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
    def __init__(self, locale: Locale, settings: Settings, state: Path, say: Say = print):
        self.locale = locale
        self.s = settings
        self.state = state
        self.say = say
        self.daemons = LocalDaemons(state)
        self.results: dict[str, Result] = {}
        self.uploaded = 0
        self.digest = ""
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

    def each(self, phase: str, hosts: Iterable[Host], work: Callable[[Remote, Host], str]) -> None:
        """Run ``work`` on every host over a bounded pool of SSH connections."""
        hosts = list(hosts)
        if not hosts:
            return
        progress = Progress(phase, len(hosts))

        def one(host: Host) -> None:
            t = time.monotonic()
            try:
                with Remote(host.name, host.address, self.s.ssh) as remote:
                    result = Result(OK, work(remote, host))
            except Unreachable as e:
                result = Result(UNREACHABLE, str(e))
            except Failed as e:
                result = Result(FAILED, str(e))
            self.results[host.name] = result
            self.seconds[host.name] = self.seconds.get(host.name, 0.0) + time.monotonic() - t
            progress.tick(result)

        with ThreadPoolExecutor(max_workers=max(1, self.s.parallel)) as pool:
            list(pool.map(one, hosts))

    def copy(self, hosts: list[Host]) -> None:
        pyz, digest = build_zipapp(self.state / "gproc.pyz")
        key = Path(self.s.key)
        key_digest = hashlib.sha256(key.read_bytes()).hexdigest()
        if self.topology is not None:  # the topology travels too: part of what must match
            key_digest = hashlib.sha256(key.read_bytes() + self.topology.read_bytes()).hexdigest()
        self.say(f"artifact {pyz} sha256 {digest[:16]}")

        def copy_one(remote: Remote, host: Host) -> str:
            d = self.remote_dir
            have = remote.run(
                f"mkdir -p -m 700 {d} && cat {d}/gproc.pyz.sha256 {d}/key.sha256 2>/dev/null; true"
            ).split()
            if digest in have and key_digest in have:
                return "artifact already there"
            remote.upload(pyz, f"{d}/gproc.pyz", 0o755)
            remote.upload(key, f"{d}/cluster.key", 0o600)
            if self.topology is not None:
                remote.upload(self.topology, self.remote_locale, 0o644)
            remote.run(
                f"echo {digest} > {d}/gproc.pyz.sha256 && echo {key_digest} > {d}/key.sha256"
            )
            with self.lock:
                self.uploaded += 1
            return "uploaded"

        self.each("copy", hosts, copy_one)
        self.digest = digest

    def start_master(self) -> None:
        if self.daemons.start_master(self.master_argv(), self.s.uds, self.s.cmdport, 30):
            self.say(f"started the master (log {self.state / 'master.log'})")
        else:
            self.say("the master is already running")

    def master_argv(self) -> list[str]:
        switches = self._switches(self.s.key, self.s.locale)
        uds = ["-defaultMasterUDS", self.s.uds, "-allow", self.s.allow]
        return [sys.executable, "-m", "gproc", *switches, *uds, "m"]

    def _switches(self, key: str, locale: str) -> list[str]:
        s = self.s
        argv = ["-locale", locale, "-cmdport", str(s.cmdport), "-key", key, "-debug", str(s.debug)]
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
                SKIPPED, f"its parent {parent} is neither in this range nor running"
            )
        for level in sorted({h.level for h in hosts}):
            here = [h for h in hosts if h.level == level]
            runnable = []
            for h in here:
                if self.results.get(h.name, Result()).state != OK:
                    continue
                parent = self.results.get(h.parent)
                if parent is not None and parent.state != OK:
                    self.results[h.name] = Result(
                        SKIPPED, f"its parent {h.parent} is {parent.state}"
                    )
                else:
                    runnable.append(h)
            self.each(f"start level {level}", runnable, self._start_slave)
            started = [h.name for h in runnable if self.results[h.name].state == OK]
            late = wait_registered(self.s.uds, started, self.s.register_timeout)
            for name in late:
                self.results[name] = Result(
                    FAILED,
                    f"did not register within "
                    f"{self.s.register_timeout:.0f}s; see "
                    f"{self.remote_dir}/slave.log there",
                )
            self.say(f"level {level}: {len(started) - len(late)} of {len(here)} registered")

    def _start_slave(self, remote: Remote, host: Host) -> str:
        d = self.remote_dir
        switches = self._switches(f"{d}/cluster.key", self.remote_locale)
        argv = ["python3", f"{d}/gproc.pyz", *switches, "-myId", str(host.number), "s"]
        script = START.format(d=d, digest=self.digest, argv=shlex.join(argv))
        return remote.run(script).strip() or "started"

    def stop_hosts(self, hosts: list[Host]) -> None:
        # leaves first, so their parents' going does not look like a failure in their logs
        for level in sorted({h.level for h in hosts}, reverse=True):
            self.each(
                f"stop level {level}",
                [h for h in hosts if h.level == level],
                lambda remote, _h: remote.run(STOP.format(d=self.remote_dir)).strip(),
            )

    # ------------------------------------------------------------ commands

    def up(self, low: int, high: int) -> bool:
        hosts = self.plan(low, high)
        t = time.monotonic()
        self.copy(hosts)
        self.start_master()
        self.start_levels(hosts)
        slowest = max(self.seconds, key=self.seconds.__getitem__, default="-")
        self.say(
            f"up: {len(hosts)} hosts in {time.monotonic() - t:.1f}s, artifact uploaded "
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

    def report(self, hosts: list[Host]) -> bool:
        """Print one line per host; True when every host is ok."""
        width = max((len(h.name) for h in hosts), default=4)
        for h in sorted(hosts, key=lambda h: h.number):
            r = self.results.get(h.name, Result(SKIPPED, "not attempted"))
            self.say(f"{h.name:<{width}}  {r.state:<11}  {r.detail}")
        bad = [h.name for h in hosts if self.results.get(h.name, Result(SKIPPED)).state != OK]
        if bad:
            self.say(f"{len(bad)} of {len(hosts)} hosts are not ok")
        return not bad


START = """\
set -e
cd {d}
if [ -f slave.pid ] && kill -0 "$(cat slave.pid)" 2>/dev/null \\
   && grep -q gproc.pyz "/proc/$(cat slave.pid)/cmdline" 2>/dev/null; then
    if [ "$(cat slave.sha256 2>/dev/null)" = "{digest}" ]; then
        echo "already running"; exit 0
    fi
    kill "$(cat slave.pid)"; sleep 0.5
fi
setsid {argv} >> {d}/slave.log 2>&1 < /dev/null &
echo $! > slave.pid
echo {digest} > slave.sha256
echo started
"""

STOP = """\
cd {d} 2>/dev/null || {{ echo "not running"; exit 0; }}
if [ -f slave.pid ] && kill -0 "$(cat slave.pid)" 2>/dev/null; then
    pid=$(cat slave.pid); kill "$pid"
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f slave.pid; echo stopped
else
    rm -f slave.pid; echo "not running"
fi
"""
