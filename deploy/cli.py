"""``gproc-deploy``: bring a gproc tree up, show it, take it down.

With ``--locale local`` the daemons run on this machine as background processes (see
gproc.deploy.local); that is the embedded default. Deployment over SSH to real nodes is the
job of the SSH path, which other locales will use.
"""

from __future__ import annotations

import argparse
import sys

from gproc.errors import GprocError

from .local import LocalTree, Settings, load_settings

EPILOG = """\
examples:
  gproc-deploy up 1 8 --locale local     master and slaves n1..n8 on this machine
  gproc e ./. /bin/date                  run date on all 8
  gproc-deploy status --locale local     the tree, from the master
  gproc-deploy down --locale local       stop everything up started
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gproc-deploy",
        epilog=EPILOG,
        description="Bring a gproc tree up level by level, show it, take it down.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="up|status|down")
    up = sub.add_parser("up", help="start the master and nodes LOW..HIGH, level by level")
    up.add_argument("low", type=int, help="first node number")
    up.add_argument("high", type=int, help="last node number")
    up.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each level to register (default 30)",
    )
    up.add_argument("--bin-root", default=None, help="binRoot of the nodes (default /tmp/xproc)")
    up.add_argument("--racksize", type=int, default=None, help="nodes per rack (default 4)")
    up.add_argument("--key", default=None, help="cluster key file (default: the user's)")
    up.add_argument("--debug", type=int, default=None, help="daemon log level (default 1)")
    sub.add_parser("status", help="show the tree as the master sees it")
    sub.add_parser("down", help="stop every daemon up started (not running is fine)")
    for name in ("up", "status", "down"):
        s = sub.choices[name]
        s.add_argument("--locale", default="local", help="topology (default local)")
        s.add_argument("--cmdport", type=int, default=6666, help="master port (default 6666)")
        s.add_argument("--uds", default=None, help="master's Unix socket (default /tmp/g)")
    return p


def settings_for(args: argparse.Namespace) -> Settings:
    """Switches given now win; the rest come from the last ``up`` on this port."""
    s = load_settings(args.cmdport)
    for field, value in (
        ("uds", args.uds),
        ("bin_root", getattr(args, "bin_root", None)),
        ("racksize", getattr(args, "racksize", None)),
        ("key", getattr(args, "key", None)),
        ("debug", getattr(args, "debug", None)),
    ):
        if value is not None:
            setattr(s, field, value)
    return s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.locale != "local":
        print(
            f"gproc-deploy: locale {args.locale!r} needs the SSH deployer, which is not "
            "built yet; use --locale local",
            file=sys.stderr,
        )
        return 2
    tree = LocalTree(settings_for(args))
    try:
        if args.command == "up":
            if not 1 <= args.low <= args.high:
                print(
                    f"gproc-deploy: bad node range {args.low}..{args.high}: need 1 <= LOW <= HIGH",
                    file=sys.stderr,
                )
                return 2
            print(tree.up(args.low, args.high, args.timeout))
        elif args.command == "status":
            print(tree.status())
        else:
            stopped = tree.down()
            print(
                f"stopped {len(stopped)} daemons"
                + (f": {', '.join(stopped)}" if stopped else " (none was running)")
            )
    except GprocError as e:
        print(f"gproc-deploy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
