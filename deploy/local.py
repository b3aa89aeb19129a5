"""The local launcher: a master and slaves 1..N as background processes on this machine.

This is the embedded default a new user runs first (``gproc-deploy up 1 8 --locale local``),
and what the tests and benchmarks use. It brings the tree up level by level as on a real
cluster: the master, then the rack masters, waiting until they have registered, then the
nodes below them. Pid files, logs and the settings ``up`` used live in a per-user state
directory, so ``status`` and ``down`` need no switches repeated.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gproc.client import ClientError, fetch_tree, format_tree, tree_rows
from gproc.errors import GprocError
from gproc.keys import create_key
from gproc.locales import LocaleOptions
from gproc.locales.local import Local


@dataclass
class Settings:
    """What ``up`` started the local tree with; stored so later commands reuse it."""

    cmdport: int = 6666
    uds: str = "/tmp/g"
    bin_root: str = "/tmp/xproc"
    racksize: int = 4
    key: str | None = None
    debug: int = 1
    heartbeat: float = 5.0


def state_dir(cmdport: int) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "gproc" / f"local-{cmdport}"


class LocalTree:
    def __init__(self, settings: Settings, state: Path | None = None):
        self.settings = settings
        self.state = state or state_dir(settings.cmdport)

    # ------------------------------------------------------------ processes

    def _gproc(self, *mode: str) -> list[str]:
        s = self.settings
        argv = [
            sys.executable,
            "-m",
            "gproc",
            "-locale",
            "local",
            "-cmdport",
            str(s.cmdport),
            "-defaultMasterUDS",
            s.uds,
            "-binRoot",
            s.bin_root,
            "-racksize",
            str(s.racksize),
            "-debug",
            str(s.debug),
            "-heartbeat",
            str(s.heartbeat),
        ]
        if s.key:
            argv += ["-key", s.key]
        return argv + list(mode)

    def _start(self, name: str, argv: list[str]) -> bool:
        """Start one daemon detached unless it already runs; True when started."""
        if self.pid(name) is not None:
            return False
        with open(self.state / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        (self.state / f"{name}.pid").write_text(f"{proc.pid}\n")
        return True

    def pid(self, name: str) -> int | None:
        """The pid of a daemon this launcher started, if it is still alive."""
        try:
            pid = int((self.state / f"{name}.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"gproc" in cmdline and not _zombie(pid) else None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.state.glob("*.pid"))

    # ------------------------------------------------------------ commands

    def up(self, low: int, high: int, timeout: float, say=print) -> str:  # noqa: ANN001
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "settings.json").write_text(json.dumps(asdict(self.settings)))
        path, created = create_key(self.settings.key)
        if created:
            say(f"created cluster key {path}")
        if self._start("master", self._gproc("m")):
            say(f"started master (log {self.state / 'master.log'})")
        self._wait(lambda names: True, timeout, "the master")
        locale = Local(
            LocaleOptions(
                cmdport=self.settings.cmdport,
                bin_root=self.settings.bin_root,
                rack_size=self.settings.racksize,
            )
        )
        hosts = locale.hosts(low, high)
        for level in sorted({h.level for h in hosts}):
            names = [h.name for h in hosts if h.level == level]
            started = [
                h.name
                for h in hosts
                if h.level == level
                and self._start(h.name, self._gproc("-myId", str(h.number), "s"))
            ]
            say(
                f"level {level}: started {len(started)}, already running "
                f"{len(names) - len(started)}"
            )
            self._wait(
                lambda live, want=names: set(want) <= live,
                timeout,
                f"level {level} ({', '.join(names)})",
                names,
            )
        return self.status()

    def _wait(self, ready, timeout: float, what: str, names: list[str] = ()) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        live: set[str] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(ClientError, OSError):
                tree = fetch_tree(self.settings.uds)
                live = {r[1] for r in tree_rows(tree) if r[4] == "up"}
                if ready(live):
                    return
            time.sleep(0.05)
        late = [n for n in names if n not in live]
        raise GprocError(
            f"timed out after {timeout:.0f}s waiting for {what}"
            + (f"; not registered: {', '.join(late)}" if late else "")
            + f"; see the logs in {self.state}"
        )

    def status(self) -> str:
        return format_tree(fetch_tree(self.settings.uds))

    def down(self, grace: float = 5.0) -> list[str]:
        """Stop every daemon this launcher started (leaves first); returns their names."""
        names = sorted(self.names(), key=lambda n: n == "master")
        pids = {n: p for n in names if (p := self.pid(n)) is not None}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in pids.values():
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in names:
            (self.state / f"{name}.pid").unlink(missing_ok=True)
        return sorted(pids)


def load_settings(cmdport: int) -> Settings:
    """The settings of the last ``up`` on this port, or the defaults."""
    try:
        return Settings(**json.loads((state_dir(cmdport) / "settings.json").read_text()))
    except (OSError, ValueError, TypeError):
        return Settings(cmdport=cmdport)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
