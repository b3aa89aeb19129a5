"""What each mode of ``gproc`` does, once the command line is parsed (see gproc.cli).

Each mode imports what it needs when it runs: ``gproc e`` is started for every job, and
the modules only a daemon or ``gproc k`` uses (logging, the key file's secrets) would add
to every job's start.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gproc.errors import GprocError, warn

if TYPE_CHECKING:
    from gproc.locales import Locale


def run(args: argparse.Namespace) -> int:
    return MODES[args.mode](args)


def locale_for(args: argparse.Namespace) -> Locale:
    from gproc.locales import LocaleOptions, load_locale

    opts = LocaleOptions(
        cmdport=args.cmdport,
        parent=args.parent,
        bin_root=args.binRoot,
        my_id=args.myId,
        rack_size=args.racksize,
    )
    return load_locale(args.locale, opts)


def key_for(args: argparse.Namespace) -> bytes:
    """The cluster key; the local locale makes one for the user when there is none."""
    from gproc.keys import create_key, load_key

    if args.locale == "local":
        path, created = create_key(args.key)
        if created:
            warn("gproc", "created cluster key %s", path)
    return load_key(args.key)


def do_master(args: argparse.Namespace) -> int:
    from gproc.master import Master
    from gproc.users import Allow

    allow = Allow.parse(args.allow)
    locale = locale_for(args)
    master = Master(
        locale.master_name(),
        locale.master_listen(),
        args.defaultMasterUDS,
        key_for(args),
        args.heartbeat,
        allow,
    )

    async def serve() -> None:
        import asyncio

        try:
            await master.start()
            await asyncio.Event().wait()
        finally:
            await master.close()

    return run_daemon(serve)


def do_slave(args: argparse.Namespace) -> int:
    from gproc.slave import NodeConfig, Slave

    place = locale_for(args).place()
    node = NodeConfig(place.name, place.bin_root, max(args.cacheMB, 0) << 20, args.launcher)
    slave = Slave(
        node,
        place.node_id,
        place.listen,
        place.parent,
        key_for(args),
        args.heartbeat,
        args.pidfile,
        max(args.reconnect, 0.0),
    )
    return run_daemon(slave.run)


def run_daemon(main: Callable[[], Awaitable[None]]) -> int:
    """Run a daemon until SIGTERM or SIGINT; a port already taken is the user's to fix."""
    from gproc.cli import run_until_signalled

    async def quietly() -> None:
        import asyncio
        import logging

        from gproc.stream import quiet_loop_errors

        quiet_loop_errors(asyncio.get_running_loop(), logging.getLogger("gproc"))
        await main()

    try:
        run_until_signalled(quietly)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            hint = " (is another daemon using this port?)" if e.errno == errno.EADDRINUSE else ""
            raise GprocError(f"cannot serve: {e.strerror or e}{hint}") from None
        raise GprocError(f"daemon stopped: {e.strerror or e}") from None
    return 0


def do_exec(args: argparse.Namespace) -> int:
    from gproc.client import run_exec

    if args.json and (args.raw or args.b):
        from gproc.cli import usage_error

        other = "-raw" if args.raw else "-b"
        raise SystemExit(
            usage_error(f"-json and {other} do not go together: both choose how output is printed")
        )
    return run_exec(exec_options(args))


def do_copy(args: argparse.Namespace) -> int:
    """gproc cp NODES SRC... DEST: the sources, shipped, placed by each node as the user."""
    from gproc.client import run_exec
    from gproc.copying import check_sources

    *sources, dest = args.command
    opts = exec_options(args, stdin=False)
    opts.argv, opts.copy, opts.private = [dest, *check_sources(sources)], True, True
    return run_exec(opts)


def do_rcopy(args: argparse.Namespace) -> int:
    """gproc rcp NODES SRC DEST: SRC from every node into DEST/NAME.NODE here."""
    import os

    from gproc.client import run_exec
    from gproc.copying import CopyError, Gatherer, rcp_argv

    source, dest = args.command
    if not os.path.isdir(dest):
        raise CopyError(f"gproc rcp: {dest} is not a directory here: make it first")
    opts = exec_options(args, stdin=False)
    opts.argv, opts.localbin, opts.private = rcp_argv(source), True, True
    return run_exec(opts, Gatherer(source, dest))


def exec_options(args: argparse.Namespace, stdin: bool | None = None):  # noqa: ANN201
    """The job a command line asks for (gproc e, and cp and rcp, which are jobs too)."""
    from gproc.client import ExecOptions

    return ExecOptions(
        spec=args.spec,
        argv=args.command,
        uds=args.defaultMasterUDS,
        root=args.r,
        libpath=[d for d in args.L.split(":") if d],
        files=[f for f in args.f.split(",") if f],
        private=args.p,
        localbin=args.localbin,
        ldenv=args.ldenv,
        skip_missing=args.skipMissing,
        raw=args.raw,
        fold=args.b,
        json=args.json,
        export=args.export,
        only=args.only,
        exclude=args.exclude,
        stdin=(not args.n and _piped_stdin()) if stdin is None else stdin,
        start_timeout=args.t,
        run_timeout=args.u,
    )


def _piped_stdin() -> bool:
    """Our standard input is there and is not a terminal: it goes to the programs."""
    import os

    try:
        os.fstat(0)
    except OSError:
        return False
    return not os.isatty(0)


def do_info(args: argparse.Namespace) -> int:
    from gproc.client import fetch_info, format_jobs, format_tree

    info = fetch_info(args.defaultMasterUDS)
    print(format_jobs(info.jobs) if args.jobs else format_tree(info.tree))
    return 0


def do_key(args: argparse.Namespace) -> int:
    from gproc.keys import create_key

    path, created = create_key(args.key)
    print(
        f"{'created' if created else 'kept the existing'} cluster key {path}; "
        "copy it, mode 0600, to every node",
        file=sys.stderr,
    )
    return 0


MODES = {
    "master": do_master,
    "slave": do_slave,
    "exec": do_exec,
    "info": do_info,
    "key": do_key,
    "copy": do_copy,
    "rcopy": do_rcopy,
}
