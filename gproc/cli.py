"""The ``gproc`` command: one program, one-letter modes, the seed's Go-style switches.

Switches come before the mode (``gproc -locale=kane s``) and may also follow it (for ``e``,
before the node spec). ``-name=value`` and ``-name value`` both work, and boolean switches take
``-p=false`` as Go's flag package does.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys

from gproc import nodespec
from gproc.errors import GprocError
from gproc.protocol import MAX_MS

MODES = {
    "m": "master",
    "s": "slave",
    "e": "exec",
    "i": "info",
    "k": "key",
    "cp": "copy",
    "rcp": "rcopy",
}
BOOLS = ("p", "launcher", "localbin", "raw", "b", "json", "ldenv", "skipMissing", "jobs", "n")
TRUE, FALSE = ("true", "1", "t", "yes", "on"), ("false", "0", "f", "no", "off")

DESCRIPTION = """\
Run a program across a cluster. The binary, every shared library it needs and any -f files
are packed on the front-end, shipped through the tree (master, rack masters, nodes), run in a
private mount that leaves nothing behind, and every node's output comes back labelled.

modes:
  m                      master, on the front-end: children connect on -cmdport, clients
                         on the Unix socket -defaultMasterUDS
  s                      slave, on every node: registers with its parent (from -locale),
                         runs jobs, serves its own children
  e NODES CMD [ARGS...]  exec: run CMD on the nodes NODES selects (or -w names); exits with
                         the largest exit status (128+signal), 124 when a node timed out
                         (-t, -u), 255 when a node was lost or unreachable; gproc's input,
                         unless a terminal (or -n), goes to every program; SIGTERM, SIGHUP,
                         SIGUSR1 and SIGUSR2 reach every program
  i                      info: the whole tree, every node's id path, name, address, level
                         and state; with -jobs, the running jobs and their users
  k                      key: create the cluster key (-key) if there is none
  cp NODES SRC... DEST   copy files or directories to DEST on every selected node, through
                         the tree, as you, each file under a temporary name then renamed,
                         modes kept; into DEST when it is a directory (or ends in /)
  rcp NODES SRC DEST     gather SRC (an absolute path) from every selected node into the
                         local directory DEST, as DEST/NAME.NODE

node specs:  1-80   nodes 1 to 80 of the first level     .    every first-level node
             1/.    node 1 and all its children           ./.  every node of a 2-level tree
             1-2,3/1-3   nodes 1, 2, 3 and children 1-3 of node 3

exit status: the job's status for e; 1 when gproc itself failed (message says why);
2 for a usage error.
"""


def add_switches(p: argparse.ArgumentParser, default: object = None) -> None:
    """The seed's switches; ``default`` overrides every default (SUPPRESS for re-parsing)."""

    def add(name: str, help: str, **kw: object) -> None:
        if default is not None:
            kw["default"] = default
        p.add_argument(f"-{name}", f"--{name}", help=help, **kw)  # type: ignore[arg-type]

    def flag(name: str, help: str) -> None:
        add(name, help, action="store_true", dest=name)
        kw = {"default": default} if default is not None else {}
        p.add_argument(
            f"--no-{name}", action="store_false", dest=name, help=argparse.SUPPRESS, **kw
        )  # type: ignore[arg-type]

    flag(
        "p",
        "private mount: the job's files are mounted over binRoot in the job's own mount "
        "namespace and vanish with it (default true; -p=false leaves them in binRoot)",
    )
    flag(
        "launcher",
        "s: fork jobs from a small launcher process, which costs a node less CPU per job than "
        "forking the daemon (default true; -launcher=false forks them from the daemon)",
    )
    flag("localbin", "run the node's own program instead of shipping it")
    add("debug", "log level 0-10 (0 warnings only, 1+ info, 5+ debug)", type=int, metavar="N")
    add(
        "f",
        "comma-separated files or directories to ship too (same path on the nodes)",
        metavar="FILES",
    )
    add("binRoot", "where jobs' files appear on a node (default /tmp/xproc)", metavar="DIR")
    add("defaultMasterUDS", "the master's Unix socket (default /tmp/g)", metavar="PATH")
    add(
        "locale",
        "topology: local, kane, kf, kane3, etchosts, or a .json/.toml topology file "
        "(default local)",
        metavar="NAME",
    )
    add("cmdport", "TCP port daemons serve children on (default 6666)", type=int, metavar="PORT")
    add(
        "r",
        "root to find the program and its libraries in (cross-architecture runs; default /)",
        metavar="ROOT",
    )
    add(
        "L",
        "extra library directories, colon-separated, searched as LD_LIBRARY_PATH would be",
        metavar="DIRS",
    )
    add("parent", "the parent's address host[:port], for locales that need it", metavar="ADDR")
    add("myId", "which node this slave is (local locale: required)", type=int, metavar="N")
    add(
        "racksize",
        "nodes per rack for kane-like locales (default: the locale's own)",
        type=int,
        metavar="N",
    )
    add(
        "cacheMB",
        "s: MiB of shipped files a node keeps, by content hash, so the same program is not "
        "shipped again (default 512; 0 turns the cache off)",
        type=int,
        metavar="MIB",
    )
    add(
        "heartbeat",
        "m, s: seconds between pings to parent and children; a peer silent for 4 beats is "
        "dropped and reported lost (default 5)",
        type=float,
        metavar="SECONDS",
    )
    add("key", "cluster key file (default ~/.config/gproc/cluster.key)", metavar="PATH")
    add(
        "reconnect",
        "s: when the parent goes away, keep the children and register again within S seconds "
        "(a parent restarting in a rolling upgrade); 0, the default, exits with the parent",
        type=float,
        metavar="S",
    )
    add(
        "pidfile",
        "s: write 'PID START-TIME' here once serving, removed on exit (gproc-deploy uses it "
        "to stop exactly this daemon)",
        metavar="PATH",
    )
    add(
        "allow",
        "m: who may use the tree: owner (the master's user, socket 0600), all (every local "
        "user, 0666) or group:NAME (0660); each job runs as its user on every node "
        "(default owner)",
        metavar="WHO",
    )
    add(
        "export",
        "e: environment shipped to the nodes: ALL, NONE or NAME,NAME... (default ALL); the "
        "nodes set USER, HOME, SHELL and PATH for what is not shipped",
        metavar="WHAT",
    )
    flag("raw", "e: print output bytes as they come, without node labels")
    flag("b", "e: fold identical outputs at the end under one node set, like clush -b")
    flag("json", "e: one JSON object per line on stdout for every event; schema: docs/OUTPUT.md")
    flag("ldenv", "e: run through LD_LIBRARY_PATH and the node's loader, as the original did")
    flag("skipMissing", "e: ship what can be found when a library is missing")
    flag("jobs", "i: list the running jobs (id, user, program, nodes, seconds) instead")
    add(
        "w",
        "e: run on these nodes, by name, wherever they sit in the tree: ClusterShell node set "
        "syntax, kn[1-20,45],kn60 (the node spec may then be left out)",
        metavar="NODES",
    )
    add("x", "e: never run on these nodes (node set syntax, as -w)", metavar="NODES")
    add(
        "t",
        "e: a node that has not started the program S seconds after the job reached it gives "
        "up and is reported (timed out starting: ...); the job goes on elsewhere (exit 124)",
        type=float,
        metavar="S",
    )
    add(
        "u",
        "e: after S seconds the program is killed wherever it still runs; those nodes are "
        "named (timed out: ...) and the exit status is 124, as timeout(1)'s",
        type=float,
        metavar="S",
    )
    flag(
        "n",
        "e: give the programs /dev/null as input; without it, gproc's input is sent to every "
        "node's program when it is not a terminal",
    )


DEFAULTS = {
    "p": True,
    "launcher": True,
    "localbin": False,
    "debug": 0,
    "f": "",
    "binRoot": "/tmp/xproc",
    "defaultMasterUDS": "/tmp/g",
    "locale": "local",
    "cmdport": 6666,
    "r": "/",
    "L": "",
    "parent": None,
    "myId": None,
    "racksize": None,
    "key": None,
    "cacheMB": 512,
    "heartbeat": 5.0,
    "allow": "owner",
    "pidfile": None,
    "reconnect": 0.0,
    "export": "ALL",
    "raw": False,
    "b": False,
    "json": False,
    "ldenv": False,
    "skipMissing": False,
    "jobs": False,
    "w": "",
    "x": "",
    "t": 0.0,
    "u": 0.0,
    "n": False,
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, told the terminal's width instead of asking ``shutil`` for it.

    argparse makes a formatter for every switch it is given and, unless told the width,
    imports ``shutil`` (and with it bz2 and lzma) to ask the terminal: about 7 ms of the
    150 ms of CPU a ``gproc e`` spent on the harness's front-end before it sent its job.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns())


@functools.cache
def _columns() -> int:
    """The width ``shutil.get_terminal_size`` gives (COLUMNS, the terminal, or 80), less
    argparse's margin of 2; asked once, not for every switch's formatter."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gproc",
        description=DESCRIPTION,
        allow_abbrev=False,
        usage="gproc [switches] m | s | e NODES CMD [ARGS...] | i | k | cp NODES SRC... DEST "
        "| rcp NODES SRC DEST",
        formatter_class=HelpFormatter,
    )
    add_switches(p)
    p.set_defaults(**DEFAULTS)
    p.add_argument("mode", help=argparse.SUPPRESS)
    return p


def go_style(argv: list[str]) -> list[str]:
    """Rewrite Go-style boolean switches (-p=false) into what argparse understands."""
    out = []
    for arg in argv:
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and eq and name in BOOLS:
            if value.lower() in TRUE:
                arg = f"-{name}"
            elif value.lower() in FALSE:
                arg = f"--no-{name}"
            else:
                raise SystemExit(usage_error(f"-{name} takes true or false, not {value!r}"))
        out.append(arg)
    return out


def usage_error(message: str) -> int:
    build_parser().print_usage(sys.stderr)
    print(f"gproc: error: {message}", file=sys.stderr)
    return 2


def split_switches(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Leading switches (with their values) and what follows them.

    Done by hand because argparse would look for its own switches inside the user's command
    (``gproc e ./. ls -l``) and stop at an abbreviation it finds ambiguous.
    """
    i = 0
    while i < len(tokens) and tokens[i].startswith("-") and tokens[i] != "-":
        name = tokens[i].lstrip("-").partition("=")[0]
        takes_value = "=" not in tokens[i] and name not in BOOLS and not name.startswith("no-")
        i += 2 if takes_value and name not in ("h", "help") else 1
    return tokens[:i], tokens[i:]


def parse(argv: list[str]) -> argparse.Namespace:
    switches, rest = split_switches(go_style(argv))
    parser = build_parser()
    args = parser.parse_args(switches + rest[:1])
    args.rest = rest[1:]
    mode = MODES.get(args.mode) or (args.mode if args.mode in MODES.values() else None)
    if mode is None:
        raise SystemExit(usage_error(f"unknown mode {args.mode!r}: use m, s, e, i, k, cp or rcp"))
    args.mode = mode
    if args.heartbeat <= 0:
        raise SystemExit(usage_error(f"-heartbeat must be positive, not {args.heartbeat}"))
    if mode in ("exec", "copy", "rcopy"):
        _parse_exec(args)
    else:
        rest = _trailing_switches(args, args.rest)
        if rest:
            raise SystemExit(usage_error(f"mode {mode} takes no arguments, got {rest[0]!r}"))
    return args


def _trailing_switches(args: argparse.Namespace, tokens: list[str]) -> list[str]:
    """Switches after the mode (``gproc i -jobs``, ``gproc e -p=false ...``) into ``args``;
    returns what follows them."""
    switches, rest = split_switches(go_style(tokens))
    p = argparse.ArgumentParser(
        prog=f"gproc {args.mode}", allow_abbrev=False, add_help=False, formatter_class=HelpFormatter
    )
    add_switches(p, default=argparse.SUPPRESS)
    vars(args).update(vars(p.parse_args(switches)))
    return rest


def _parse_exec(args: argparse.Namespace) -> None:
    """Switches may follow ``e``; then come the node spec (optional with -w) and the command."""
    rest = _trailing_switches(args, args.rest)
    args.only = node_set(args.w, "-w")
    args.exclude = node_set(args.x, "-x")
    if args.only and rest and not _is_spec(rest[0]):
        rest = ["", *rest]  # -w names the nodes: no spec needed
    what = {"exec": "a command", "copy": "SRC... DEST", "rcopy": "SRC DEST"}[args.mode]
    if not rest:
        raise SystemExit(usage_error(f"{args.mode} needs a node spec (or -w NODES) and {what}"))
    least, most = {"exec": (2, None), "copy": (3, None), "rcopy": (3, 3)}[args.mode]
    if len(rest) < least or (most is not None and len(rest) > most):
        raise SystemExit(usage_error(f"{args.mode} needs {what} after the node spec"))
    args.spec, args.command = rest[0], rest[1:]
    if args.spec or not args.only:  # only -w may leave the spec out
        try:
            nodespec.parse(args.spec)
        except nodespec.SpecError as e:
            raise SystemExit(usage_error(str(e))) from None
    for name in ("t", "u"):
        value = getattr(args, name)
        if not 0 <= value <= MAX_MS // 1000:  # also nan; inf and beyond what the header holds
            raise SystemExit(
                usage_error(f"-{name} takes seconds (0 to {MAX_MS // 1000}), not {value}")
            )


def _is_spec(token: str) -> bool:
    """Whether a word after ``e -w NODES`` is a node spec rather than the command."""
    try:
        nodespec.parse(token)
    except nodespec.SpecError:
        return False
    return True


def node_set(text: str, switch: str) -> list[str]:
    """Node names in ClusterShell's node set syntax (``kn[1-20,45],kn60``), expanded."""
    if not text:
        return []
    from ClusterShell.NodeSet import NodeSet, NodeSetException

    try:
        return list(NodeSet(text))
    except NodeSetException as e:
        raise SystemExit(usage_error(f"{switch} {text!r}: not a node set ({e})")) from None


DAEMONS = ("master", "slave")


def setup_logging(level: int) -> None:
    """Timestamped log lines on standard error, for the daemons or at ``-debug`` above 0.

    A client at the default level leaves logging alone, and does not import it: its rare
    warnings (a file it could not cache) reach standard error as the bare message.
    """
    import logging

    lvl = logging.WARNING if level <= 0 else logging.INFO if level < 5 else logging.DEBUG
    logging.basicConfig(
        level=lvl, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if args.mode in DAEMONS or args.debug > 0:
            setup_logging(args.debug)
        from gproc import commands

        return commands.run(args)
    except KeyboardInterrupt:
        print("gproc: interrupted; the job is killed on every node", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output left (gproc e ... | head): stop quietly, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except GprocError as e:
        print(f"gproc: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(error: BaseException) -> str:
    """The error's message on one line (lines joined by " / "), or its kind if it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " / ".join(lines) or type(error).__name__


def run_until_signalled(coro_factory: object) -> None:
    """Run a daemon's coroutine; SIGTERM and SIGINT end it cleanly."""

    import asyncio
    import contextlib

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro_factory())  # type: ignore[operator]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(runner())


if __name__ == "__main__":
    sys.exit(main())
