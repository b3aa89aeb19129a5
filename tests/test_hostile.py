"""Hostile peers against real daemons: each is refused and the tree keeps serving jobs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from pathlib import Path

import msgpack
import pytest
from conftest import Tree
from peers import conn_of

from gproc.bundle import Entry
from gproc.client import BlockingConn, ExecOptions, Sender, build_job
from gproc.protocol import (
    MAX_FRAME,
    PREAUTH_MAX,
    VERSION,
    BadJob,
    Done,
    Error,
    Exit,
    Hello,
    JobHeader,
    Need,
    Out,
    ProtocolError,
    Register,
    data_prefix,
    decode,
    encode,
    frame_bytes,
)
from gproc.session import handshake


def run_job(tree: Tree) -> None:
    r = tree.gproc("e", "./.", "/bin/true")
    assert r.returncode == 0, r.stderr


def master_port(tree: Tree) -> int:
    return tree.launcher.settings.cmdport


def raw_exchange(port: int, payload: bytes, read: bool = True) -> bytes:
    """Send bytes to a daemon's TCP port and return whatever it sends back before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while read and (chunk := s.recv(65536)):
            got += chunk
        return got


def test_peer_without_the_key_is_refused(tree: Tree) -> None:
    async def attempt() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", master_port(tree))
        conn = conn_of(reader, writer)
        try:
            await handshake(conn, os.urandom(32), dialer=True, role="slave")
        finally:
            await conn.close()

    with pytest.raises(ConnectionError):  # the master closes without proving anything itself
        asyncio.run(attempt())
    run_job(tree)
    assert "does not hold the cluster key" in (tree.root / "state" / "master.log").read_text()


def test_without_the_key_a_peer_cannot_register(tree: Tree) -> None:
    """Skipping the proof and sending a register frame gets the connection closed."""
    hello = frame_bytes(Hello(VERSION, "slave", os.urandom(32)))
    register = frame_bytes(Register(3, "intruder", "x", []))
    raw_exchange(master_port(tree), hello + register)
    r = tree.gproc("i")
    assert "intruder" not in r.stdout
    run_job(tree)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 3,  # half a length header
        struct.pack(">I", 100) + b"\x93short",  # half-sent frame
        struct.pack(">I", PREAUTH_MAX + 1) + b"x" * 1000,  # longer than a hello may be
        struct.pack(">I", 0xFFFFFFFF),  # absurd length
        os.urandom(4096),  # garbage
        struct.pack(">I", 3) + msgpack.packb([1, 2]),  # a frame of no kind
        frame_bytes(Hello(1, "slave", b"n" * 32)),  # protocol version 1
    ],
)
def test_bad_bytes_close_only_that_connection(tree: Tree, payload: bytes) -> None:
    raw_exchange(master_port(tree), payload)
    raw_exchange(master_port(tree) + 4, payload)  # a rack master's port too
    run_job(tree)


def test_bad_bytes_on_the_unix_socket(tree: Tree) -> None:
    for payload in (
        os.urandom(64),
        struct.pack(">I", MAX_FRAME + 1),
        struct.pack(">I", 2) + msgpack.packb([99]),
        frame_bytes(
            JobHeader("", "./.", "not a list", {}, "/", "local", "", "", [], False, True, [], 0)
        ),  # type: ignore[arg-type]
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(15)
            s.connect(tree.uds)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    run_job(tree)


def test_unix_socket_is_private(tree: Tree) -> None:
    assert os.stat(tree.uds).st_mode & 0o777 == 0o600


def test_hostile_manifest_is_refused_before_fanout(tree: Tree) -> None:
    header = JobHeader(
        "",
        "./.",
        ["/bin/true"],
        {},
        "/",
        "loader",
        "/bin/true",
        "",
        [],
        False,
        True,
        [{"p": "../../etc/passwd", "k": "f", "m": 0o644, "s": 1, "h": b"\0" * 32, "l": ""}],
        1,
    )

    async def send() -> Error:
        reader, writer = await asyncio.open_unix_connection(tree.uds)
        conn = conn_of(reader, writer, limit=MAX_FRAME)
        await conn.send(header)
        reply = await conn.recv()
        await conn.close()
        return reply

    reply = asyncio.run(send())
    assert type(reply) is Error
    assert "climbs out of the root" in reply.message
    run_job(tree)


def test_frame_cap_is_enforced_on_send() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Out("ab", "n1", 1, b"x" * (MAX_FRAME + 1)))


@pytest.mark.parametrize("old", [1, 2])
def test_an_older_peer_learns_which_version_we_speak(tree: Tree, old: int) -> None:
    """A daemon of an older protocol gets our hello (so it can say why) and is refused."""
    old_hello = {"t": "hello", "v": old, "kind": "slave", "nonce": b"n" * 32}
    body = msgpack.packb(old_hello, use_bin_type=True)
    got = raw_exchange(master_port(tree), struct.pack(">I", len(body)) + body)
    (size,) = struct.unpack(">I", got[:4])
    reply = msgpack.unpackb(got[4 : 4 + size])
    assert reply["t"] == "hello" and reply["v"] == VERSION
    assert len(got) == 4 + size  # and nothing more: the connection was closed
    run_job(tree)


def test_a_header_with_a_field_of_the_wrong_type_gets_an_answer(tree: Tree) -> None:
    """libdirs=5 used to close the client's connection without a word."""
    header = JobHeader("", "./.", ["/bin/true"], {}, "/", "local", "", "", [], False, True, [], 0)
    good = encode(header)
    fields = msgpack.unpackb(good)
    fields[9] = 5  # libdirs
    body = msgpack.packb(fields, use_bin_type=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(tree.uds)
        s.sendall(struct.pack(">I", len(body)) + body)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    reply = decode(got[4:])
    assert type(reply) is Error
    assert "libdirs" in reply.message
    run_job(tree)


def test_a_copy_whose_source_climbs_out_of_its_staging_is_refused() -> None:
    """gproc cp's sources are read under the job's staging directory: no way out of it."""
    header = JobHeader("ab", ".", ["/tmp/dest", "/../../etc/shadow"], {}, "/", "copy", "", "",
                       [], False, True, [], 0)  # fmt: skip
    with pytest.raises(BadJob, match="copy source '/../../etc/shadow' is not a clean"):
        decode(encode(header))


def _client_job(tree: Tree, ship: Path) -> tuple[BlockingConn, list[Entry], list[int]]:
    """A client connection with a job shipping ``ship`` to every node, up to the master's
    need (the entries the nodes lack)."""
    header, manifest = build_job(ExecOptions(spec="./.", argv=["/bin/true"], files=[str(ship)]))
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(tree.uds)
    conn = BlockingConn(sock)
    conn.send(header)
    while (frame := conn.recv()) is not None and type(frame) is not Need:
        pass
    assert frame is not None, "the master answered the job with its need"
    return conn, manifest, frame.files


def test_a_client_cannot_cache_bytes_under_another_files_digest(tree: Tree, tmp_path: Path) -> None:
    """The manifest names the digest of one file, the client sends another's bytes, each
    chunk with its own true SHA-256 (so every hop takes the frames): every node refuses the
    bundle, and nothing is cached under the digest claimed (each node builds a file's
    digest from the chunks that came, gproc/digest.py)."""
    good, evil = tmp_path / "good", tmp_path / "evil"
    good.write_bytes(os.urandom(3 << 20))
    evil.write_bytes(os.urandom(3 << 20))
    conn, manifest, needed = _client_job(tree, good)
    entry = next(e for e in manifest if e.src == str(good))
    claimed = entry.sha256.hex()
    entry.src = str(evil)  # the same size: only the bytes differ from what the manifest says
    Sender(conn, manifest).start(needed)
    refused = []
    while (frame := conn.recv()) is not None and type(frame) is not Done:
        if type(frame) is Exit:
            refused.append(frame.status != 0)
        elif type(frame) is Out:
            assert b"do not match the manifest's sha256 digest" in frame.data, frame.data
    conn.close()
    assert refused == [True] * 8, "every node refused the bundle"
    assert claimed not in {p.name for p in tree.bin_root.glob("*.cache/*")}
    run_job(tree)


def test_a_chunk_that_does_not_match_its_sha256_closes_the_client(tree: Tree) -> None:
    """A data frame whose bytes were altered (its SHA-256 left as it was) is refused where
    it arrives: the master drops that client and serves the next job."""
    conn, manifest, needed = _client_job(tree, Path("/etc/hostname"))
    data = b"x" * manifest[needed[0]].size
    body = data_prefix("", needed[0], hashlib.sha256(b"y" * len(data)).digest()) + data
    conn.sock.sendall(struct.pack(">I", len(body)) + body)
    while (frame := conn.recv()) is not None:
        assert type(frame) is not Exit, "no node ran the job"
    conn.close()
    run_job(tree)
