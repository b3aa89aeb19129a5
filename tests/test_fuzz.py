"""Property-based fuzzing of the frame decoder and of the handshake of live daemons.

The decoder: every input, random or a mutation of a valid frame, either decodes to a frame
of a known kind (which encodes back to the same frame) or raises ProtocolError; nothing
else escapes. The handshake: random and mutated hello and proof bytes sent to the master's
and a rack master's port get at most the daemon's own hello back, never a proof, and the
connection closed; afterwards each daemon's peak memory is under MEMORY_BOUND and the tree
runs the next job on all 8 nodes. Example counts are fixed, so the run's time is known
(about 20 s on a 2-core machine); each test prints how many inputs it tried.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter

import msgpack
import pytest
from conftest import Tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import answers_all, memory_kib

from gproc.protocol import (
    KINDS,
    LENGTH,
    MAC,
    NONCE,
    VERSION,
    Bye,
    Credit,
    Data,
    Done,
    Drain,
    Draining,
    Error,
    Exit,
    Frame,
    Hello,
    Info,
    Input,
    JobHeader,
    Kill,
    Late,
    Lost,
    Need,
    Out,
    Ping,
    Plan,
    Proof,
    ProtocolError,
    Refused,
    Register,
    Signal,
    Subtree,
    TreeReply,
    Welcome,
    decode,
    encode,
)

MEMORY_BOUND = 100 << 10  # KiB: a daemon's peak resident memory after the fuzzing
DECODE_EXAMPLES = 5000
HANDSHAKE_EXAMPLES = 1000  # per daemon and strategy
FUZZ = settings(
    database=None,
    deadline=5000,  # ms per example; examples take a few ms, so only a hang trips it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NODE = {"id": 1, "name": "n4", "addr": "127.0.0.1:1", "state": "up", "children": []}
VALID: list[Frame] = [
    Hello(VERSION, "slave", bytes(range(NONCE))),
    Proof(b"\x07" * MAC),
    Register(1, "n4", "127.0.0.1:6670", [NODE]),
    Welcome("master"),
    Refused("id 1 is taken"),
    Subtree([dict(NODE, children=[dict(NODE, id=2)])]),
    Ping(),
    Bye(),
    JobHeader(
        "ab12",
        "./.",
        ["/bin/echo", "hi"],
        {"A": "b"},
        "/tmp",
        "loader",
        "/bin/echo",
        "/lib64/ld-linux-x86-64.so.2",
        ["/lib"],
        True,
        True,
        [{"p": "bin/echo", "k": "f", "m": 0o755, "s": 3, "h": b"h" * 32, "l": ""}],
        3,
    ),  # fmt: skip
    Data("ab12", 0, b"abc"),
    Input("ab12", b"a line\n"),
    Signal("ab12", 15),
    Drain(["kn1", "kn2"], True),
    Draining(["ab12"]),
    Late("ab12", ["n1", "n2"], "run"),
    Need("ab12", [0, 2]),
    Out("ab12", "n1", 1, b"hello\n"),
    Exit("ab12", "n1", 0),
    Lost("ab12", ["n2", "n3"], "connection lost"),
    Done("ab12"),
    Kill("ab12"),
    Credit("ab12", 65536),
    Info(),
    TreeReply({"id": 0, "name": "master", "addr": "a", "state": "up", "children": [NODE]}),
    Plan(["n1", "n2"], []),
    Error("no", ["n5 (lost)"]),
]
KNOWN = (Hello, Data, *KINDS.values())  # a data frame is not msgpack: its own decoder
assert {type(f) for f in VALID} == set(KNOWN), "a frame kind has no example"


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply edits (0 overwrite, 1 insert, 2 delete, 3 truncate, 4 duplicate) at positions
    taken modulo the length, so every edit lands somewhere."""
    out = bytearray(data)
    for op, pos, chunk in edits:
        at = pos % (len(out) + 1)
        if op == 0:
            out[at : at + len(chunk)] = chunk
        elif op == 1:
            out[at:at] = chunk
        elif op == 2:
            del out[at : at + len(chunk) + 1]
        elif op == 3:
            del out[at:]
        else:
            out[at:at] = out[at : at + 16]
    return bytes(out)


EDITS = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=6,
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6)


def _shaped(kind: int) -> st.SearchStrategy:
    """An array that starts with a real kind and has as many fields as that kind has."""
    n = len(KINDS[kind].CHECKS)
    fields = st.lists(FIELDS, min_size=n, max_size=n)
    return fields.map(lambda f: msgpack.packb([kind, *f], use_bin_type=True))


VALUES = st.recursive(SCALARS, _containers, max_leaves=30)
FIELDS = SCALARS | _containers(SCALARS)
JOBS = st.text("0123456789abcdef", min_size=1, max_size=33)
NAMES = st.text(max_size=24)
# frames of the kinds that cross links most, with made-up contents, most of them valid
BUILT = st.one_of(
    st.builds(Data, JOBS, st.integers(0, 1 << 21), st.binary(max_size=64)),
    st.builds(Out, JOBS, NAMES, st.integers(0, 3), st.binary(max_size=64)),
    st.builds(Exit, JOBS, NAMES, st.integers(-(1 << 32), 1 << 32)),
    st.builds(Credit, JOBS, st.integers(0, 1 << 31)),
    st.builds(Need, JOBS, st.lists(st.integers(0, 1 << 20), max_size=5)),
    st.builds(Lost, JOBS, st.lists(NAMES, max_size=3), NAMES),
    st.builds(Kill, JOBS),
    st.builds(Hello, st.just(VERSION), st.text(max_size=34), st.binary(min_size=31, max_size=33)),
    st.builds(Register, st.integers(0, 1 << 32), NAMES, NAMES, st.just([])),
).map(encode)
SHAPED = st.sampled_from(sorted(KINDS)).flatmap(_shaped)
HELLOISH = st.fixed_dictionaries(
    {
        "t": st.sampled_from(["hello", "hullo"]),
        "v": st.sampled_from([1, 2, 3, 4, "3"]),
        "kind": st.text(max_size=40),
        "nonce": st.binary(min_size=30, max_size=34),
    }  # fmt: skip
).map(lambda d: msgpack.packb(d, use_bin_type=True))
MUTATED = st.tuples(st.sampled_from(VALID), EDITS).map(lambda p: mutate(encode(p[0]), p[1]))
BODIES = st.one_of(
    st.binary(max_size=2048),
    MUTATED,
    BUILT,
    st.tuples(BUILT, EDITS).map(lambda p: mutate(*p)),
    SHAPED,
    HELLOISH,
    VALUES.map(msgpack.packb),
)


def test_decode_accepts_or_raises_protocol_error(record_property) -> None:  # noqa: ANN001
    outcome: Counter[str] = Counter()

    @settings(FUZZ, max_examples=DECODE_EXAMPLES)
    @given(BODIES)
    def check(body: bytes) -> None:
        try:
            frame = decode(body)
        except ProtocolError:
            outcome["refused"] += 1
            return
        assert type(frame) in KNOWN
        assert decode(encode(frame)) == frame  # what a daemon accepts it can also send
        outcome["decoded"] += 1

    check()
    tried = sum(outcome.values())
    print(f"decode: {tried} inputs, {outcome['decoded']} decoded, {outcome['refused']} refused")
    record_property("inputs", tried)
    assert outcome["decoded"] and outcome["refused"]


def test_every_valid_frame_round_trips() -> None:
    for frame in VALID:
        assert decode(encode(frame)) == frame


# ---------------------------------------------------------------- the handshake, live


def framed(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


HELLO = framed(encode(Hello(VERSION, "slave", b"\x01" * NONCE)))
PROOF = framed(encode(Proof(b"\x02" * MAC)))
# what a dialer sends: a hello and a proof, each of them valid, mutated or made up
FRAMES = st.one_of(
    st.just(HELLO),
    st.just(PROOF),
    st.builds(
        lambda n: framed(encode(Hello(VERSION, "slave", n))), st.binary(min_size=32, max_size=32)
    ),
    HELLOISH.map(framed),
    BODIES.map(framed),
    st.binary(max_size=64),
    st.integers(0, (1 << 32) - 1).map(lambda n: struct.pack(">I", n)),  # a bare length
)
CONVERSATIONS = st.one_of(
    st.lists(FRAMES, min_size=1, max_size=4).map(b"".join),
    st.tuples(st.just(HELLO + PROOF), EDITS).map(lambda p: mutate(*p)),
    st.binary(max_size=4096),
)


def talk(port: int, data: bytes) -> bytes:
    """Send ``data``, end our side, and return what the daemon said before it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the daemon may close on the first bad byte: that is a refusal
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def fuzz_daemon(port: int, tried: Counter[str], answered: Counter[str], name: str) -> None:
    """Send HANDSHAKE_EXAMPLES conversations to the daemon on ``port``, checking each reply."""

    @settings(FUZZ, max_examples=HANDSHAKE_EXAMPLES)
    @given(CONVERSATIONS)
    def check(data: bytes) -> None:
        tried[name] += 1
        reply = talk(port, data)
        if reply:  # only ever the daemon's own hello: no proof without one from us
            answered[name] += 1
            (size,) = LENGTH.unpack(reply[:4])
            assert len(reply) == 4 + size, reply
            assert type(decode(reply[4:])) is Hello

    check()


def test_handshake_fuzz_against_live_daemons(tree: Tree, record_property) -> None:  # noqa: ANN001
    targets = {"master": tree.launcher.settings.cmdport, "n4": tree.launcher.settings.cmdport + 4}
    tried: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    start = time.monotonic()
    for name, port in targets.items():
        fuzz_daemon(port, tried, answered, name)
    took = time.monotonic() - start
    peaks = {name: memory_kib(tree.pid(name))["VmHWM"] for name in targets}
    print(
        f"handshake fuzz: {dict(tried)} inputs in {took:.1f}s, answered with a hello "
        f"{dict(answered)}; peak memory (VmHWM) KiB {peaks}"
    )
    record_property("inputs", sum(tried.values()))
    record_property("peak_kib", peaks)
    for name, peak in peaks.items():
        assert peak < MEMORY_BOUND, f"{name} peaked at {peak} KiB"
    answers_all(tree)


def test_decoder_bombs_cost_nothing() -> None:
    """Small bodies that declare huge containers are refused, not allocated."""
    for body in (
        b"\xdd\xff\xff\xff\xff",  # an array of 4G items, none present
        b"\xdf\xff\xff\xff\xff",  # a map of 4G pairs
        b"\xc6\xff\xff\xff\xff",  # a binary of 4 GiB
        b"\xdd\x00\x40\x00\x00" + b"\x80" * 1000,  # 4M empty maps, 1000 present
        b"\x91" * 1000 + b"\xc0",  # 1000 nested arrays
    ):
        with pytest.raises(ProtocolError):
            decode(body)
