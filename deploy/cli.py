"""``gproc-deploy``: copy gproc to nodes, bring the tree up level by level, show it, stop it.

With ``--locale local`` the daemons run on this machine as background processes (see
gproc.deploy.local); that is the embedded default. Every other locale (kane, kf, etchosts, a
topology file) reaches its nodes over SSH (see gproc.deploy.ssh); run it on the front-end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gproc.errors import GprocError

from .remote import SshOptions

if TYPE_CHECKING:
    from .ssh import SshDeployer  # Fabric stays unimported until SSH is used

EPILOG = """\
examples:
  gproc-deploy up 1 8 --locale local     master and slaves n1..n8 on this machine
  gproc-deploy up 1 80 --locale kane     copy gproc to kn1..kn80 over SSH and start the tree
  gproc e ./. /bin/date                  run date on every node
  gproc-deploy status --locale kane      the tree, from the master
  gproc-deploy down --locale kane        stop everything up started
  gproc-deploy up 1 80 --check           what up would do, changing nothing
  gproc-deploy rollback                  the previous artifact again, rack by rack

Every host ends as ok (nothing to do), changed (what was done), failed, unreachable or
skipped (not touched, and why), then a recap line counts them.

exit status: 0 when every host is ok or changed; 1 when any host failed, is unreachable or
was skipped (or gproc-deploy itself failed), and for status when a deployed host is not up
in the tree; 2 for a usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gproc-deploy",
        epilog=EPILOG,
        description="Copy gproc to the nodes and bring its tree up level by level.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="up|copy|status|down|rollback")
    up = sub.add_parser("up", help="copy gproc, start the master and nodes LOW..HIGH by level")
    copy = sub.add_parser("copy", help="copy the artifact and key to nodes LOW..HIGH only")
    status = sub.add_parser("status", help="show the tree as the master sees it")
    down = sub.add_parser("down", help="stop what up started (not running is fine)")
    rollback = sub.add_parser(
        "rollback", help="deploy the artifact before the current one again (kept on the nodes)"
    )
    for s in (up, copy):
        s.add_argument("low", type=int, help="first node number")
        s.add_argument("high", type=int, help="last node number")
    rollback.add_argument("low", type=int, nargs="?", help="first node number (default: all)")
    rollback.add_argument("high", type=int, nargs="?", help="last node number")
    down.add_argument("low", type=int, nargs="?", help="first node number (default: all)")
    down.add_argument("high", type=int, nargs="?", help="last node number")
    for s in (up, down):
        s.add_argument("--dry-run", action="store_true", help="print the plan, touch nothing")
    up.add_argument(
        "--check",
        action="store_true",
        help="connect, compare and print per host exactly what up would do; change nothing",
    )
    for s in (up, copy, status, down, rollback):
        _common(s)
    for s in (up, copy, down, rollback, status):
        _ssh(s)
    for s in (up, rollback):
        s.add_argument(
            "--serial",
            type=int,
            default=1,
            help="a changed artifact, key or setting restarts a running tree rack by rack, this "
            "many racks at a time, the master last (default 1; 0: all at once, the tree down)",
        )
        s.add_argument(
            "--max-fail",
            type=int,
            default=0,
            help="failed hosts a batch may have before the rollout stops (default 0)",
        )
        s.add_argument(
            "--drain-timeout",
            type=float,
            default=60.0,
            help="seconds running jobs get on a batch before its restart (default 60)",
        )
    up.add_argument(
        "--retry-failed",
        action="store_true",
        help="only the hosts of LOW..HIGH that were not ok or changed at the last run",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for each level to register (default 30 local, 60 ssh)",
    )
    up.add_argument("--racksize", type=int, default=None, help="nodes per rack (local: 4)")
    up.add_argument("--parent", default=None, help="the front-end's address, for the nodes")
    up.add_argument("--debug", type=int, default=None, help="daemon log level (default 1)")
    up.add_argument(
        "--allow",
        default=None,
        metavar="WHO",
        help="who may use the tree: owner (default), all, or group:NAME; each job runs as "
        "its user on every node (gproc m -allow)",
    )
    return p


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--locale",
        default=None,
        help="local, kane, kf, etchosts or a .json/.toml topology file (default: the locale "
        "of the last up on this port, else local)",
    )
    s.add_argument("--cmdport", type=int, default=6666, help="daemons' port (default 6666)")
    s.add_argument("--uds", default=None, help="the master's Unix socket (default /tmp/g)")
    s.add_argument(
        "--key",
        default=None,
        help="cluster key (default ~/.config/gproc/cluster.key; made if missing)",
    )
    s.add_argument("--bin-root", default=None, help="binRoot of the nodes (default /tmp/xproc)")


def _ssh(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("ssh (every locale but local)")
    g.add_argument("--user", default=None, help="remote user (default: yours, or ssh config)")
    g.add_argument("--identity", "-i", default=None, help="private key file")
    g.add_argument("--port", type=int, default=22, help="sshd port (default 22)")
    g.add_argument("--parallel", type=int, default=32, help="SSH connections at once (32)")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    g.add_argument("--command-timeout", type=float, default=60.0, help="seconds (default 60)")
    g.add_argument(
        "--remote-dir",
        default="/tmp/gproc-deploy",
        help="where the artifact, key, logs and pid files go on a node (default /tmp/gproc-deploy)",
    )
    g.add_argument(
        "--accept-new-host-keys",
        action="store_true",
        help="trust and remember host keys not yet in known_hosts (default: refuse)",
    )
    g.add_argument("--known-hosts", default=None, help="default ~/.ssh/known_hosts")
    g.add_argument(
        "--lock-wait",
        type=float,
        default=30.0,
        help="seconds to wait for another gproc-deploy run of this tree (default 30)",
    )


def usage(message: str) -> int:
    print(f"gproc-deploy: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    low, high = getattr(args, "low", None), getattr(args, "high", None)
    if (low is None) != (high is None) or (low is not None and not 1 <= low <= high):
        return usage(f"bad node range {low}..{high}: give both, with 1 <= LOW <= HIGH")
    args.locale = args.locale or remembered_locale(args.cmdport)
    try:
        if getattr(args, "allow", None):
            from gproc.users import Allow

            Allow.parse(args.allow)  # a bad value fails here, not in the master's log
        if args.command == "up" and not args.dry_run and not args.check:
            from gproc.locales import LocaleOptions, load_locale

            load_locale(args.locale, LocaleOptions(cmdport=args.cmdport))  # a bad one: no memory
            remember_locale(args.locale, args.cmdport)
        if args.locale == "local":
            return run_local(args)
        return run_ssh(args)
    except GprocError as e:
        print(f"gproc-deploy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gproc-deploy: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- local


def run_local(args: argparse.Namespace) -> int:
    from .local import LocalTree, load_settings

    if args.command == "copy":
        return usage("copy is for locales reached over SSH; local needs no copy")
    if args.command == "rollback" or getattr(args, "check", False):
        return usage(
            f"{'rollback' if args.command == 'rollback' else '--check'} is for "
            "locales reached over SSH; the local tree runs the installed gproc"
        )
    s = load_settings(args.cmdport)
    for field, value in (
        ("uds", args.uds),
        ("bin_root", args.bin_root),
        ("racksize", getattr(args, "racksize", None)),
        ("key", args.key),
        ("debug", getattr(args, "debug", None)),
        ("allow", getattr(args, "allow", None)),
    ):
        if value is not None:
            setattr(s, field, value)
    tree = LocalTree(s)
    if getattr(args, "dry_run", False):
        print(f"{args.command} the local tree on ports {s.cmdport}.. (dry run: nothing is touched)")
        return 0
    if args.command == "up":
        print(tree.up(args.low, args.high, args.timeout or 30.0))
    elif args.command == "status":
        print(tree.status())
    else:
        stopped = tree.down()
        print(
            f"stopped {len(stopped)} daemons"
            + (f": {', '.join(stopped)}" if stopped else " (none was running)")
        )
    return 0


# ---------------------------------------------------------------- ssh


def run_ssh(args: argparse.Namespace) -> int:
    from gproc.client import fetch_tree, format_tree
    from gproc.keys import create_key, default_key_path
    from gproc.locales import LocaleOptions, load_locale

    from .ssh import Settings, SshDeployer

    uds = args.uds or "/tmp/g"
    if args.command != "status" and not getattr(args, "dry_run", False):
        try:
            import fabric  # noqa: F401
        except ImportError:
            raise GprocError(
                "deploying over SSH needs Fabric: pip install 'gproc[deploy]'"
            ) from None
    state = ssh_state_dir(args.locale, args.cmdport)
    key = args.key or str(default_key_path())
    opts = LocaleOptions(
        cmdport=args.cmdport,
        parent=getattr(args, "parent", None),
        bin_root=args.bin_root or "/tmp/xproc",
        rack_size=getattr(args, "racksize", None),
    )
    locale = load_locale(args.locale, opts)  # a LocaleError is a GprocError: one line, exit 1
    settings = Settings(
        locale=args.locale,
        cmdport=args.cmdport,
        uds=uds,
        key=key,
        parent=getattr(args, "parent", None),
        bin_root=args.bin_root,
        debug=getattr(args, "debug", None) or 1,
        allow=getattr(args, "allow", None) or "owner",
        check=getattr(args, "check", False),
        serial=max(getattr(args, "serial", 1), 0),
        max_fail=max(getattr(args, "max_fail", 0), 0),
        drain_timeout=max(getattr(args, "drain_timeout", 60.0), 0.0),
        parallel=args.parallel,
        register_timeout=getattr(args, "timeout", None) or 60.0,
        ssh=SshOptions(
            user=args.user,
            identity=args.identity,
            port=args.port,
            connect_timeout=args.connect_timeout,
            command_timeout=args.command_timeout,
            remote_dir=args.remote_dir,
            accept_new_host_keys=args.accept_new_host_keys,
            known_hosts=args.known_hosts,
        ),
    )
    deployer = SshDeployer(locale, settings, state)
    if args.command == "status":
        tree = fetch_tree(uds)
        print(format_tree(tree))
        return status_against_deployed(state, tree, deployer)
    low, high = args.low, args.high
    whole = low is None
    if whole:
        low, high = last_range(state)
    hosts = deployer.plan(low, high)
    if getattr(args, "dry_run", False):
        print(deployer.describe(hosts, args.command))
        return 0
    from .lock import run_lock

    check_up_front(settings.ssh)
    with run_lock(state, args.lock_wait, print):
        if args.command in ("up", "rollback"):
            check = getattr(args, "check", False)
            path, created = create_key(key) if not check else (key, False)
            if created:
                print(f"created cluster key {path}")
            only = None
            if getattr(args, "retry_failed", False):
                only = deployer.failed_last_time()
                if not only:
                    print("nothing failed at the last run: nothing to retry")
                    return 0
            ok = deployer.up(low, high, only, rollback=args.command == "rollback")
            if ok and not check:  # a failed up keeps what the last good one remembered
                remember_range(state, low, high)
            if live := _tree_or_none(uds):
                print(live)
        elif args.command == "copy":
            create_key(key)
            deployer.copy(hosts)
            ok = deployer.report(hosts)
        else:
            ok = deployer.down(hosts, master_too=whole)
    return 0 if ok else 1


def check_up_front(ssh: SshOptions) -> None:
    """What every host would fail on alike is one error before any host is contacted."""
    if ssh.identity and not os.access(ssh.identity, os.R_OK):
        why = "does not exist" if not os.path.exists(ssh.identity) else "cannot be read"
        raise GprocError(f"--identity {ssh.identity} {why}: give the private key file")
    known = ssh.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
    if not ssh.accept_new_host_keys and not os.path.isfile(known):
        raise GprocError(
            f"no known_hosts file at {known}: every host key would be unknown; give "
            "--known-hosts FILE, or --accept-new-host-keys to trust and remember them"
        )


def status_against_deployed(state: Path, tree: dict, deployer: SshDeployer) -> int:
    """Each deployed host: its state in the tree and the artifact it holds, against the one
    deployed last; 1, naming them, when hosts are missing, lost or on another artifact."""
    from gproc.client import tree_rows
    from gproc.nodespec import fold

    try:
        low, high = last_range(state)
    except GprocError:
        return 0  # nothing deployed from here to compare with
    hosts = deployer.plan(low, high)
    seen = {name: st for _, name, _, _, st in tree_rows(tree)[1:]}
    current = deployer.current_artifact()
    held = deployer.artifacts_held(hosts) if current else {}
    width = max((len(h.name) for h in hosts), default=4)
    problems: dict[str, list[str]] = {}
    for h in sorted(hosts, key=lambda h: h.number):
        where = seen.get(h.name, "missing")
        if where != "up":
            problems.setdefault(where, []).append(h.name)
        r = held.get(h.name)
        if r is None:
            version = "artifact: -"
        elif r.state != "ok":
            version = f"artifact unknown ({r.state}: {r.detail})"
            problems.setdefault("of unknown artifact", []).append(h.name)
        elif r.detail == current:
            version = f"artifact {current[:12]} (the deployed one)"
        else:
            version = f"artifact {r.detail[:12] or 'none'}, not the deployed {current[:12]}"
            problems.setdefault("on another artifact", []).append(h.name)
        print(f"{h.name:<{width}}  {where:<7}  {version}")
    if not problems:
        return 0
    said = "; ".join(f"{what}: {fold(names)}" for what, names in problems.items())
    print(f"gproc-deploy: deployed hosts not as deployed: {said}", file=sys.stderr)
    return 1


def _tree_or_none(uds: str) -> str | None:
    from gproc.client import ClientError, fetch_tree, format_tree

    try:
        return format_tree(fetch_tree(uds))
    except (ClientError, OSError):
        return None


def ssh_state_dir(locale: str, cmdport: int) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "gproc" / f"{Path(locale).stem}-{cmdport}"


def remember_range(state: Path, low: int, high: int) -> None:
    """What this front-end has deployed, widened by every good up: plain down covers it."""
    state.mkdir(parents=True, exist_ok=True)
    try:
        before = last_range(state)
        low, high = min(low, before[0]), max(high, before[1])
    except GprocError:
        pass
    (state / "deploy.json").write_text(json.dumps({"low": low, "high": high}))


def last_range(state: Path) -> tuple[int, int]:
    try:
        saved = json.loads((state / "deploy.json").read_text())
        return int(saved["low"]), int(saved["high"])
    except (OSError, ValueError, KeyError, TypeError):
        raise GprocError(f"no earlier 'up' recorded in {state}: give LOW HIGH") from None


def _last_up() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "gproc" / "last-up.json"


def remember_locale(locale: str, cmdport: int) -> None:
    """So that a plain ``down`` or ``status`` acts on the tree ``up`` started."""
    path = _last_up()
    path.parent.mkdir(parents=True, exist_ok=True)
    if locale.endswith((".json", ".toml")):
        locale = os.path.abspath(locale)
    path.write_text(json.dumps({"locale": locale, "cmdport": cmdport}))


def remembered_locale(cmdport: int) -> str:
    try:
        last = json.loads(_last_up().read_text())
        if last.get("cmdport") == cmdport and isinstance(last.get("locale"), str):
            return last["locale"]
    except (OSError, ValueError, AttributeError):
        pass
    return "local"


if __name__ == "__main__":
    sys.exit(main())
