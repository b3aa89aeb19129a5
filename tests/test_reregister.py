"""A child that registers again while a job waits on its old connection: the job ends."""

from __future__ import annotations

import asyncio
import subprocess

from conftest import Tree
from peers import conn_of

from gproc.keys import load_key
from gproc.protocol import JobHeader, Register, Welcome
from gproc.session import handshake
from gproc.stream import Conn, within


async def child(tree: Tree, key: bytes) -> Conn:
    """A child holding the key, registered under the master as id 9, "extra"."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tree.launcher.settings.cmdport)
    conn = conn_of(reader, writer)
    await handshake(conn, key, dialer=True, role="slave")
    await conn.send(Register(9, "extra", "127.0.0.1:1", []))
    assert type(await within(conn.recv(), 10)) is Welcome
    return conn


def test_the_old_connections_jobs_are_reported_lost(own_tree: Tree) -> None:
    key = load_key(own_tree.launcher.settings.key)

    async def scenario() -> subprocess.CompletedProcess:
        first = await child(own_tree, key)
        client = own_tree.popen("e", "9", "/bin/true")
        while type(await within(first.recv(), 30)) is not JobHeader:
            pass  # the job reached the first connection, which never answers it
        second = await child(own_tree, key)  # the same node, registering again
        try:
            out, err = await asyncio.to_thread(client.communicate, timeout=30)
        finally:
            await second.close()
            await first.close()
        return subprocess.CompletedProcess(client.args, client.returncode, out, err)

    done = asyncio.run(scenario())
    assert done.returncode == 255, done.stderr
    assert "lost extra" in done.stderr
    assert own_tree.gproc("e", "1-2/.", "/bin/true").returncode == 0  # "extra" is lost now
