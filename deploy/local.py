"""The local launcher: a master and slaves 1..N as background processes on this machine.

This is the embedded default a new user runs first (``gproc-deploy up 1 8 --locale local``),
and what the tests and benchmarks use. It brings the tree up level by level as on a real
cluster: the master, then the rack masters, waiting until they have registered, then the
nodes below them. Pid files, logs and the settings ``up`` used live in a per-user state
directory, so ``status`` and ``down`` need no switches repeated.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from gproc.client import fetch_tree, format_tree
from gproc.errors import GprocError
from gproc.keys import create_key
from gproc.locales import LocaleOptions
from gproc.locales.local import Local
from gproc.nodespec import fold

from .daemons import LocalDaemons, live_nodes, orphans, wait_registered


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
    allow: str = "owner"  # gproc m -allow: who may use the tree
    reconnect: float = 0.0  # gproc s -reconnect: seconds a slave waits for a parent to return


def state_dir(cmdport: int) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "gproc" / f"local-{cmdport}"


class LocalTree:
    def __init__(self, settings: Settings, state: Path | None = None):
        self.settings = settings
        self.state = state or state_dir(settings.cmdport)
        self.daemons = LocalDaemons(self.state)

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
        if mode == ("m",):
            argv += ["-allow", s.allow]
        elif s.reconnect:
            argv += ["-reconnect", str(s.reconnect)]
        return argv + list(mode)

    def pid(self, name: str) -> int | None:
        return self.daemons.pid(name)

    # ------------------------------------------------------------ commands

    def up(self, low: int, high: int, timeout: float, say=print) -> str:  # noqa: ANN001
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "settings.json").write_text(json.dumps(asdict(self.settings)))
        path, created = create_key(self.settings.key)
        if created:
            say(f"created cluster key {path}")
        if self.daemons.start_master(
            self._gproc("m"), self.settings.uds, self.settings.cmdport, timeout
        ):
            say(f"started master (log {self.state / 'master.log'})")
        locale = Local(
            LocaleOptions(
                cmdport=self.settings.cmdport,
                bin_root=self.settings.bin_root,
                rack_size=self.settings.racksize,
            )
        )
        hosts = locale.hosts(low, high)
        lonely = orphans(hosts, locale.master_name(), live_nodes(self.settings.uds) or set())
        if lonely:
            raise GprocError(
                f"{fold(lonely)} hang below {fold(set(lonely.values()))}, which is neither in "
                f"{low}..{high} nor running: include it, or choose another --racksize"
            )
        for level in sorted({h.level for h in hosts}):
            here = [h for h in hosts if h.level == level]
            started = [
                h
                for h in here
                if self.daemons.start(h.name, self._gproc("-myId", str(h.number), "s"))
            ]
            say(
                f"level {level}: started {len(started)}, already running {len(here) - len(started)}"
            )
            late = wait_registered(self.settings.uds, [h.name for h in here], timeout)
            if late:
                raise GprocError(
                    f"timed out after {timeout:.0f}s waiting for level {level}; not registered: "
                    f"{', '.join(late)}; see the logs in {self.state}"
                )
        return self.status()

    def status(self) -> str:
        return format_tree(fetch_tree(self.settings.uds))

    def down(self, grace: float = 5.0) -> list[str]:
        """Stop every daemon this launcher started (leaves first); returns their names."""
        return self.daemons.stop(sorted(self.daemons.names(), key=lambda n: n == "master"), grace)


def load_settings(cmdport: int) -> Settings:
    """The settings of the last ``up`` on this port, or the defaults."""
    try:
        return Settings(**json.loads((state_dir(cmdport) / "settings.json").read_text()))
    except (OSError, ValueError, TypeError):
        return Settings(cmdport=cmdport)
