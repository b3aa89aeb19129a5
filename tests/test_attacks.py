"""Attacks on the session layer by someone without the cluster key, against real daemons.

A fake parent on a starting slave's parent port, a fake child registering an impostor, and a
man in the middle between a slave and its real parent: each tries to make a daemon act on a
frame it did not get from a peer holding the key. What must hold, as a user would see it:
the injected program never runs (its marker file never appears), no impostor shows in
``gproc i``, the attacked link closes with one reason in the log, and the tree keeps running
jobs on all 8 nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Tree, assert_clean_logs, start_tree
from peers import (
    FreshSlave,
    Relay,
    answers_all,
    body_of,
    conn_of,
    local_job,
    log_of,
    read_frame,
    sealed_with_guess,
    spare_port,
    unsealed,
    wait_until,
)

from gproc.client import fetch_tree, tree_rows
from gproc.keys import load_key
from gproc.protocol import (
    LENGTH,
    MAC,
    VERSION,
    Exit,
    Frame,
    Hello,
    JobHeader,
    Ping,
    Proof,
    Register,
    Welcome,
    encode,
    frame_bytes,
)
from gproc.session import handshake
from gproc.stream import Conn

ACCEPT_TIMEOUT = 20
EXIT_TIMEOUT = 20


def rows(tree: Tree) -> list[tuple[str, str, str]]:
    """(id path, name, state) of every node ``gproc i`` would show."""
    return [(p, n, s) for p, n, _, _, s in tree_rows(fetch_tree(tree.uds))[1:]]


def touch_job(marker: Path) -> JobHeader:
    return local_job(["/bin/sh", "-c", f"touch {marker}"])


# ---------------------------------------------------------------- a fake parent

FAKE_PARENT = [
    "relay-then-unsealed-job",  # borrow the master's proof by relaying; job without a MAC
    "relay-then-guessed-seal",  # same; job sealed with keys derived from a guessed key
    "relay-then-echo",  # same; the slave's own sealed register sent back to it as a job
    "borrowed-proof",  # own hello; show the slave's proof to the master to get one back
    "reflected-proof",  # own hello; the slave's proof sent back as the parent's proof
    "no-proof",  # own hello; the job straight after it
]


async def _fake_parent(tree: Tree, port: int, slave_dir: Path, strategy: str,
                       job: JobHeader) -> tuple[FreshSlave, bytes | None]:  # fmt: skip
    """Serve ``port`` as the fresh slave's parent and play ``strategy``; returns the slave
    and whatever the master answered to a borrowed proof (None when not asked)."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", port)
    slave = FreshSlave(tree, port, 3, slave_dir)
    master_answer = None
    try:
        reader, writer = await asyncio.wait_for(accepted.get(), ACCEPT_TIMEOUT)
        slave_hello = await read_frame(reader)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", tree.launcher.settings.cmdport)
        if strategy.startswith("relay"):
            up_w.write(slave_hello)
            master_hello = await read_frame(up_r)
            writer.write(master_hello)
            up_w.write(await read_frame(reader))  # the slave's proof, to the master
            writer.write(await read_frame(up_r))  # the master's proof, to the slave
            register = await read_frame(reader)  # the slave's first sealed frame
            if strategy == "relay-then-unsealed-job":
                injection = unsealed(job)
            elif strategy == "relay-then-guessed-seal":
                injection = sealed_with_guess(job, slave_hello[4:], master_hello[4:])
            else:
                injection = register
        else:
            writer.write(frame_bytes(Hello(VERSION, "parent", os.urandom(32))))
            slave_proof = await read_frame(reader)
            if strategy == "borrowed-proof":
                up_w.write(slave_hello + slave_proof)
                up_w.write_eof()
                master_answer = await asyncio.wait_for(up_r.read(), ACCEPT_TIMEOUT)
                injection = frame_bytes(Proof(bytes(32))) + frame_bytes(job)
            elif strategy == "reflected-proof":
                injection = slave_proof + frame_bytes(job)
            else:
                injection = frame_bytes(job)
        up_w.close()
        with contextlib.suppress(ConnectionError):
            writer.write(injection)
            await writer.drain()
            await asyncio.wait_for(reader.read(), EXIT_TIMEOUT)  # the slave closes the link
        writer.close()
    finally:
        server.close()
    return slave, master_answer


@pytest.mark.parametrize("strategy", FAKE_PARENT)
def test_fake_parent_cannot_run_a_job(tree: Tree, tmp_path: Path, strategy: str) -> None:
    marker = tmp_path / "MARKER"
    slave, master_answer = asyncio.run(
        _fake_parent(tree, spare_port(), tmp_path, strategy, touch_job(marker))
    )
    try:
        status = slave.wait_exit(EXIT_TIMEOUT, "the slave to give up on its fake parent")
        reason = {
            "relay-then-unsealed-job": "bad MAC",
            "relay-then-guessed-seal": "bad MAC",
            "relay-then-echo": "bad MAC",
            "borrowed-proof": "does not hold the cluster key",
            "reflected-proof": "does not hold the cluster key",
            "no-proof": "did not prove the cluster key",
        }[strategy]
        assert reason in slave.log(), slave.log()
        assert status != 0
    finally:
        slave.stop()
    if master_answer is not None:
        # the master saw a proof for another transcript: it said hello and nothing more
        hello_only = len(frame_bytes(Hello(VERSION, "parent", bytes(32))))
        assert len(master_answer) == hello_only, master_answer
    assert not marker.exists(), "the injected job ran"
    assert "Traceback" not in slave.log()
    answers_all(tree)


def test_a_parent_with_the_key_does_run_the_job(tree: Tree, tmp_path: Path) -> None:
    """The control for the test above: the same job from a parent that holds the key runs,
    so a marker that stays absent there means the job was refused."""
    marker = tmp_path / "MARKER"
    port = spare_port()
    key = load_key(tree.launcher.settings.key)

    async def honest() -> FreshSlave:
        accepted: asyncio.Queue[Conn] = asyncio.Queue()
        server = await asyncio.start_server(
            lambda r, w: accepted.put_nowait(conn_of(r, w)), "127.0.0.1", port
        )
        slave = FreshSlave(tree, port, 3, tmp_path)
        try:
            conn = await asyncio.wait_for(accepted.get(), ACCEPT_TIMEOUT)
            await handshake(conn, key, dialer=False, role="parent")
            assert type(await conn.recv()) is Register
            await conn.send(Welcome("fake"))
            await conn.send(touch_job(marker))
            await asyncio.to_thread(wait_until, marker.exists, 20, "the job to run")
            await conn.close()
        finally:
            server.close()
        return slave

    slave = asyncio.run(honest())
    slave.wait_exit(EXIT_TIMEOUT, "the slave to exit when its parent goes")
    assert marker.exists()


# ---------------------------------------------------------------- a fake child

FAKE_CHILD = [
    "no-key",  # hello, a made-up proof, the register
    "wrong-key",  # a full handshake attempt with a key of its own
    "relay-then-unsealed",  # a real slave's handshake relayed, then a register without MAC
    "relay-then-guessed-seal",  # same, the register sealed with keys from a guessed key
    "relay-then-altered",  # same, the slave's own sealed register with the body swapped
]


async def _fake_child(tree: Tree, target: int, strategy: str, slave_dir: Path) -> bytes:
    """Try to register ("impostor", id 55) at ``target``; returns what the target sent after
    the register frame (it must be nothing: no welcome)."""
    impostor = Register(55, "impostor", "127.0.0.1:1", [])
    up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
    slave = None
    server = None
    try:
        if strategy == "no-key":
            up_w.write(frame_bytes(Hello(VERSION, "slave", os.urandom(32))))
            await read_frame(up_r)
            injection = frame_bytes(Proof(os.urandom(32))) + frame_bytes(impostor)
        elif strategy == "wrong-key":
            conn = conn_of(up_r, up_w)
            with pytest.raises(ConnectionError):  # refused before the target proves anything
                await handshake(conn, os.urandom(32), dialer=True, role="slave")
            injection = frame_bytes(impostor)
        else:
            port = spare_port()
            accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
            accepted = asyncio.Queue()
            server = await asyncio.start_server(
                lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", port
            )
            slave = FreshSlave(tree, port, 3, slave_dir)
            reader, writer = await asyncio.wait_for(accepted.get(), ACCEPT_TIMEOUT)
            slave_hello = await read_frame(reader)
            up_w.write(slave_hello)
            target_hello = await read_frame(up_r)
            writer.write(target_hello)
            up_w.write(await read_frame(reader))
            writer.write(await read_frame(up_r))
            genuine = await read_frame(reader)  # the slave's sealed register, not forwarded
            writer.close()
            if strategy == "relay-then-unsealed":
                injection = unsealed(impostor)
            elif strategy == "relay-then-guessed-seal":
                injection = sealed_with_guess(
                    impostor, slave_hello[4:], target_hello[4:], to_acceptor=True
                )
            else:
                payload = encode(impostor) + genuine[-MAC:]  # a genuine MAC, another body
                injection = LENGTH.pack(len(payload)) + payload
        with contextlib.suppress(ConnectionError):
            up_w.write(injection)
            await up_w.drain()
        return await asyncio.wait_for(up_r.read(), EXIT_TIMEOUT)
    finally:
        up_w.close()
        if server is not None:
            server.close()
        if slave is not None:
            await asyncio.to_thread(slave.stop)


@pytest.mark.parametrize("target", ["master", "n4"])
@pytest.mark.parametrize("strategy", FAKE_CHILD)
def test_fake_child_cannot_register_an_impostor(
    tree: Tree, tmp_path: Path, strategy: str, target: str
) -> None:
    port = tree.launcher.settings.cmdport + (4 if target == "n4" else 0)
    after = asyncio.run(_fake_child(tree, port, strategy, tmp_path))
    assert after == b"", f"the {target} answered the impostor: {after!r}"
    assert not [r for r in rows(tree) if r[1] == "impostor" or r[0].endswith("55")]
    answers_all(tree)


# ---------------------------------------------------------------- a man in the middle


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    """A tree of 8 with 1 s heartbeats (so pings cross the relayed link every second)."""
    t = start_tree(tmp_path_factory.mktemp("relayed"), heartbeat=1.0)
    yield t
    t.launcher.down()
    assert_clean_logs(t)


def states(tree: Tree, path: str) -> list[str]:
    """The state of the node at id path ``path`` (the fresh slave is 3: the tree's own n3 is
    1/3), empty when the master does not know it."""
    return [s for p, _, s in rows(tree) if p == path]


class Session:
    """A fresh slave n3 (id 3 under the master) that reaches the master only via a relay."""

    def __init__(self, tree: Tree, relay: Relay, workdir: Path):
        self.tree = tree
        self.relay = relay
        before = relay.sessions
        self.slave = FreshSlave(tree, relay.listen, 3, workdir, heartbeat=1.0)
        wait_until(lambda: relay.sessions > before, ACCEPT_TIMEOUT, "the slave to dial")
        wait_until(lambda: states(tree, "3") == ["up"], ACCEPT_TIMEOUT, "n3 to register")
        # and the slave has taken the welcome: a SIGTERM while it waits for it can be lost
        # (slave.register's asyncio.wait_for swallows a cancel that meets the frame)
        wait_until(lambda: "registered with" in self.slave.log(), 15, "n3 to be welcomed")

    def end_cleanly(self) -> None:
        """Stop the slave (it says bye), so the master forgets n3 instead of showing it lost."""
        self.slave.stop()
        wait_until(lambda: not states(self.tree, "3"), 15, "the master to forget n3")


def counter_lines(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def count_job(tree: Tree, counter: Path) -> int:
    r = tree.gproc("e", "3", "/bin/sh", "-c", f"echo run >> {counter}")
    return r.returncode


MITM = [
    "forged",  # a job sealed with keys derived from everything seen but the key
    "unsealed",  # a job with 32 made-up bytes for its MAC
    "replayed",  # the sealed header of an earlier job on this link, sent again
    "reordered",  # a job's header held back until the ping after it has passed
    "dropped",  # one ping from the parent dropped on the way
    "replayed-in-new-session",  # the sealed header of a job of an earlier session
    "replayed-upwards",  # the slave's sealed exit report sent to the master again
]


@pytest.mark.parametrize("attack", MITM)
def test_man_in_the_middle_cannot_act_in_a_session(
    relayed: Tree, tmp_path: Path, attack: str
) -> None:
    tree = relayed
    marker, counter = tmp_path / "MARKER", tmp_path / "COUNTER"
    relay = Relay(spare_port(), tree.launcher.settings.cmdport)
    try:
        first = Session(tree, relay, tmp_path / "s1")
        assert count_job(tree, counter) == 0, "an honest relay passes a job"
        assert counter_lines(counter) == 1
        job_frames = [f for f, frame in relay.sealed("down") if type(frame) is JobHeader]
        exit_frames = [f for f, frame in relay.sealed("up") if type(frame) is Exit]
        assert job_frames and exit_frames
        victim = first.slave
        if attack == "replayed-in-new-session":
            first.end_cleanly()
            victim = Session(tree, relay, tmp_path / "s2").slave
        seen = len(relay.sealed("down"))
        refusals = log_of(tree, "master").count("bad MAC")
        if attack == "forged":
            up, down = relay.hellos()
            relay.inject("down", sealed_with_guess(touch_job(marker), up, down, seq=seen))
        elif attack == "unsealed":
            relay.inject("down", unsealed(touch_job(marker)))
        elif attack in ("replayed", "replayed-in-new-session"):
            relay.inject("down", job_frames[0])
        elif attack == "reordered":
            relay.tamper["down"] = reorder_job_header()
            r = tree.gproc("e", "3", "/bin/sh", "-c", f"echo run >> {counter}")
            assert r.returncode == 255 and "n3" in r.stderr, (r.returncode, r.stderr)
        elif attack == "dropped":
            relay.tamper["down"] = drop_one(Ping)
        elif attack == "replayed-upwards":
            relay.inject("up", exit_frames[0])
        if attack == "replayed-upwards":
            wait_until(lambda: log_of(tree, "master").count("bad MAC") > refusals, 15, "a refusal")
            assert states(tree, "3") == ["lost"]
        else:
            victim.wait_exit(EXIT_TIMEOUT, "the slave to close its parent link")
            assert "bad MAC" in victim.log(), victim.log()
        assert not marker.exists(), "the injected job ran"
        assert counter_lines(counter) == 1, "a replayed or reordered job ran"
        # the tree heals: n3 comes back through an honest relay, then leaves for good
        relay.tamper = {"down": None, "up": None}
        first.slave.stop()
        victim.stop()
        Session(tree, relay, tmp_path / "s3").end_cleanly()
    finally:
        relay.close()
    answers_all(tree)


def reorder_job_header() -> Callable[[bytes], list[bytes]]:
    """A relay tamper: hold the first job header back and send it after the next frame (a
    ping, at most a heartbeat later)."""
    held: list[bytes] = []
    done = False

    def tamper(frame: bytes) -> list[bytes]:
        nonlocal done
        if not held and not done and type(body_of(frame, True)) is JobHeader:
            held.append(frame)
            return []
        if held:
            done = True
            return [frame, held.pop()]
        return [frame]

    return tamper


def drop_one(kind: type[Frame]) -> Callable[[bytes], list[bytes]]:
    """A relay tamper: drop the first frame of ``kind``, pass every other."""
    dropped = False

    def tamper(frame: bytes) -> list[bytes]:
        nonlocal dropped
        if not dropped and type(body_of(frame, True)) is kind:
            dropped = True
            return []
        return [frame]

    return tamper
