"""The gproc wire protocol, version 3: every frame kind, its fields, and the one codec.

Every frame kind is a small dataclass below with a numeric ``KIND`` and its fields in wire
order. A frame travels as a msgpack array ``[KIND, field1, field2, ...]``; only the hello is a
map (``{"t": "hello", "v": 3, ...}``), because it is the one frame a peer of another version
must still be able to read and answer with a clear error. :func:`encode` is the only way a
frame becomes bytes and :func:`decode` the only way bytes become a frame: it checks every
field once (types, lengths, depth, the job header's rules) and raises :class:`ProtocolError`,
so the rest of the code handles typed values and never spells a field name. Decoding a job
header that is well framed but wrong raises :class:`BadJob`, which carries the job id so a
hop can fail that one job instead of its link.

docs/PROTOCOL.md describes the framing, the handshake, the session MACs, the flow control
and the limits around these frames; gproc.session implements the handshake and the MACs.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from gproc.digest import CHUNK, SIZE, chunk_digest
from gproc.errors import GprocError

VERSION = 3
# The largest body after authentication: a job header, whose manifest takes about 110 bytes
# plus the path per file (50,000 files under a 60-character directory make 5.4 MB).
MAX_FRAME = 16 << 20
PREAUTH_MAX = 1024  # largest body before authentication: a hello or a proof
LENGTH = struct.Struct(">I")
NONCE = 32
MAC = 32
MAX_TREE_DEPTH = 16
MAX_NODES = 1 << 16  # nodes in a tree, names in a plan
MAX_TEXT = 1 << 16  # any one string but env values and argv items
MAX_ARG = 1 << 20  # one argv item or env value
MAX_MS = 1 << 40  # a timeout in milliseconds: about 35 years
MAX_ID = (1 << 32) - 2  # a uid or gid ((uid_t)-1 means "unchanged" to the kernel)

Tree = dict[str, Any]  # {"id": int, "name": str, "addr": str, "state": str, "children": [...]}

JOB_ID = re.compile(r"[0-9a-f]{1,32}")
MODES = ("loader", "env", "local", "direct", "copy")  # copy: gproc cp (argv: DEST SOURCE...)


class ProtocolError(GprocError):
    """The peer broke the protocol; the connection is closed with this reason logged."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol; the message says which."""


class BadJob(ProtocolError):
    """A well-framed job header with a bad field: that job fails, the link stays up."""

    def __init__(self, job: str, reason: str):
        super().__init__(f"bad job header: {reason}")
        self.job = job
        self.reason = reason


# ---------------------------------------------------------------- field checks

Check = Callable[[Any], Any]


def _fail(what: str) -> ProtocolError:
    return ProtocolError(what)


def uint(limit: int = 1 << 62) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int or not 0 <= v <= limit:
            raise _fail(f"not an integer in 0..{limit}")
        return v

    return check


def sint(v: Any) -> int:
    if type(v) is not int or not -(1 << 31) <= v < 1 << 31:
        raise _fail("not a 32-bit integer")
    return v


def text(limit: int = MAX_TEXT) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str or len(v) > limit or "\0" in v:
            raise _fail(f"not a string of at most {limit} characters without NUL")
        return v

    return check


def blob(limit: int = MAX_FRAME, exact: int | None = None) -> Check:
    def check(v: Any) -> bytes:
        if type(v) is not bytes or len(v) > limit or (exact is not None and len(v) != exact):
            raise _fail(f"not a byte string of {exact if exact is not None else limit} bytes")
        return v

    return check


def flag(v: Any) -> bool:
    if type(v) is not bool:
        raise _fail("not a boolean")
    return v


def texts(limit: int = MAX_NODES, each: int = MAX_TEXT) -> Check:
    item = text(each)

    def check(v: Any) -> list[str]:
        if type(v) is not list or len(v) > limit:
            raise _fail(f"not a list of at most {limit} strings")
        return [item(s) for s in v]

    return check


def uints(limit: int = 1 << 20) -> Check:
    item = uint()

    def check(v: Any) -> list[int]:
        if type(v) is not list or len(v) > limit:
            raise _fail(f"not a list of at most {limit} integers")
        return [item(i) for i in v]

    return check


def job_id(v: Any) -> str:
    if type(v) is not str or not JOB_ID.fullmatch(v):
        raise _fail("not a job id (1 to 32 hex digits)")
    return v


def trees(v: Any, depth: int = 0) -> list[Tree]:
    """A subtree list: every node's fields typed, at most MAX_TREE_DEPTH levels deep."""
    if type(v) is not list or depth > MAX_TREE_DEPTH or len(v) > MAX_NODES:
        raise _fail(f"not a list of nodes at most {MAX_TREE_DEPTH} levels deep")
    for node in v:
        if type(node) is not dict or set(node) != {"id", "name", "addr", "state", "children"}:
            raise _fail("a node is not a map of id, name, addr, state and children")
        uint(1 << 31)(node["id"])
        for key in ("name", "addr", "state"):
            text(256)(node[key])
        trees(node["children"], depth + 1)
    return v


def tree(v: Any) -> Tree:
    return trees([v])[0]


def raw_list(limit: int = 1 << 20) -> Check:
    """A list whose items a later stage checks (a manifest, by gproc.bundle)."""

    def check(v: Any) -> list[Any]:
        if type(v) is not list or len(v) > limit:
            raise _fail(f"not a list of at most {limit} items")
        return v

    return check


def env_map(v: Any) -> dict[str, str]:
    if type(v) is not dict or len(v) > 1 << 14:
        raise _fail("not a map of at most 16384 variables")
    for name, value in v.items():
        text(4096)(name)
        text(MAX_ARG)(value)
        if not name or "=" in name:
            raise _fail(f"variable name {name[:40]!r} is empty or holds '='")
    return v


# ---------------------------------------------------------------- frame kinds


def frame(cls: type) -> type:
    """A frame kind: a dataclass with slots, whose ``==`` and repr come from :class:`Frame`.

    The dataclass decorator compiles every method it writes, three for each of the 27 kinds;
    written once in the base, ``==`` and repr cost nothing at import, which every ``gproc e``
    pays when it starts.
    """
    return dataclass(cls, slots=True, repr=False, eq=False)


@frame
class Frame:
    """Base of every frame kind; ``KIND`` is its number on the wire."""

    KIND: ClassVar[int] = 0
    CHECKS: ClassVar[tuple[Check, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        compared = (f.name for f in fields(self) if f.compare)
        return all(getattr(self, name) == getattr(other, name) for name in compared)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({shown})"


def _kind(code: int, *checks: Check) -> Callable[[type[Frame]], type[Frame]]:
    def register(cls: type[Frame]) -> type[Frame]:
        cls.KIND = code
        cls.CHECKS = checks
        assert len(fields(cls)) == len(checks), cls
        assert code not in KINDS, code
        KINDS[code] = cls
        return cls

    return register


KINDS: dict[int, type[Frame]] = {}


@frame
class Hello(Frame):
    """First frame each side of a TCP link sends (a map, readable by any version)."""

    version: int
    role: str  # what the sender is: "master", "slave", "parent"; for logs
    nonce: bytes


Hello.KIND = 1


@_kind(2, blob(MAC, MAC))
@frame
class Proof(Frame):
    """Proof of the cluster key over the handshake transcript (gproc.session)."""

    mac: bytes


@_kind(3, uint(1 << 31), text(256), text(256), trees)
@frame
class Register(Frame):
    """Child to parent, once, right after the handshake: who it is and what lies below."""

    node_id: int
    name: str
    addr: str
    children: list[Tree]


@_kind(4, text(256))
@frame
class Welcome(Frame):
    parent: str


@_kind(5, text(4096))
@frame
class Refused(Frame):
    reason: str


@_kind(6, trees)
@frame
class Subtree(Frame):
    """Child to parent whenever its subtree changes."""

    children: list[Tree]


@_kind(7)
@frame
class Ping(Frame):
    pass


@_kind(8)
@frame
class Bye(Frame):
    """Child to parent: I am being stopped (forget me, do not report me lost)."""


@frame
class JobHeader(Frame):
    """A job, as the client sends it (``job`` empty) and as hops pass it down."""

    job: str
    spec: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    mode: str
    prog: str
    interp: str
    libdirs: list[str]
    argv0: bool
    private: bool
    manifest: list[Any]
    total: int
    # Who runs the job: stamped by the master from the client socket's peer credentials
    # (SO_PEERCRED), never taken from the client; empty from the client itself.
    user: str = ""
    uid: int = 0
    gid: int = 0
    stdin: bool = False  # the client sends its standard input (Input frames) after the files
    start_ms: int = 0  # -t: a node that has not started the program by then gives up (0: no)
    run_ms: int = 0  # -u: the program is killed where it still runs by then (0: no limit)
    only: list[str] = field(default_factory=list)  # -w/-x: the names that run (empty: all)
    exclude: list[str] = field(default_factory=list)  # -x, client to master only


def _job_id_or_empty(v: Any) -> str:
    return v if v == "" else job_id(v)


_kind(
    10,
    _job_id_or_empty,
    text(4096),
    texts(1 << 16, MAX_ARG),
    env_map,
    text(4096),
    text(16),
    text(4096),
    text(4096),
    texts(256, 4096),
    flag,
    flag,
    raw_list(1 << 20),
    uint(),
    text(256),
    uint(MAX_ID),
    uint(MAX_ID),
    flag,
    uint(MAX_MS),
    uint(MAX_MS),
    texts(MAX_NODES, 256),
    texts(MAX_NODES, 256),
)(JobHeader)


@frame
class Data(Frame):
    """One chunk of manifest entry ``index``, in order; parent to child under the job's window.

    Not msgpack: a data frame is a small fixed header, the chunk's sha256 and the raw bytes
    (:func:`data_prefix`), so no hop copies the bytes to pack or unpack them, the MAC covers
    the sha256 instead of the bytes, and a hop checks that sha256 once on arrival
    (gproc.digest says why; docs/PROTOCOL.md, "Data frames", the layout).
    """

    KIND: ClassVar[int] = 11
    job: str
    index: int
    data: bytes | memoryview
    digest: bytes = field(default=b"", compare=False)  # of ``data``; encode() fills it in


DATA_MARK = 0xC1  # never a msgpack type byte: a data body cannot be taken for another frame
_DATA_INDEX = struct.Struct(">I")
MAX_INDEX = 1 << 20  # manifest entries of one job


def data_prefix(job: str, index: int, digest: bytes) -> bytes:
    """What precedes a chunk's bytes in a data frame's body; the frame's MAC covers it."""
    name = job.encode("ascii")
    return bytes((DATA_MARK, len(name))) + name + _DATA_INDEX.pack(index) + digest


def data_prefix_length(body: bytes | memoryview) -> int:
    """Bytes of ``body``'s prefix when it is a data frame's, else 0."""
    if not body or body[0] != DATA_MARK:
        return 0
    if len(body) < 2 or len(body) < 2 + body[1] + _DATA_INDEX.size + SIZE:
        raise ProtocolError("data frame shorter than its header")
    return 2 + body[1] + _DATA_INDEX.size + SIZE


def _data(body: bytes | memoryview) -> Data:
    """A data frame's body as a frame, once its bytes match the sha256 it carries."""
    view = memoryview(body)
    start = data_prefix_length(view)
    name_end = 2 + view[1]
    try:
        job = _job_id_or_empty(bytes(view[2:name_end]).decode("ascii"))
    except (UnicodeDecodeError, ProtocolError):
        raise ProtocolError("data frame with a bad job id") from None
    (index,) = _DATA_INDEX.unpack_from(view, name_end)
    if index >= MAX_INDEX:
        raise ProtocolError(f"data frame for manifest entry {index}, beyond {MAX_INDEX}")
    digest, data = bytes(view[start - SIZE : start]), view[start:]
    if len(data) > CHUNK:
        raise ProtocolError(f"data frame of {len(data)} bytes, more than a {CHUNK}-byte chunk")
    if chunk_digest(data) != digest:
        raise ProtocolError("data frame whose bytes do not match its sha256 (altered on the way)")
    return Data(job, index, data, digest)


@_kind(12, _job_id_or_empty, uints())
@frame
class Need(Frame):
    """Which manifest entries this subtree lacks; child to parent (master to client)."""

    job: str
    files: list[int]


@_kind(13, job_id, text(256), uint(2), blob(1 << 20))
@frame
class Out(Frame):
    """Output of the program on ``node`` (fd 1 or 2); up the tree under the job's window."""

    job: str
    node: str
    fd: int
    data: bytes


@_kind(14, job_id, text(256), sint)
@frame
class Exit(Frame):
    job: str
    node: str
    status: int


@_kind(15, job_id, texts(), text(4096))
@frame
class Lost(Frame):
    job: str
    nodes: list[str]
    reason: str


@_kind(16, job_id)
@frame
class Done(Frame):
    """Everything of the job below the sender has been reported."""

    job: str


@_kind(17, job_id)
@frame
class Kill(Frame):
    job: str


@_kind(18, job_id, uint(1 << 30))
@frame
class Credit(Frame):
    """The receiver took ``size`` more bytes of the job: the sender may send that many more."""

    job: str
    size: int


@_kind(19, _job_id_or_empty, blob(CHUNK))
@frame
class Input(Frame):
    """The client's standard input for the job's programs, down the tree under the job's
    file window; empty ``data`` is the end of input."""

    job: str
    data: bytes


# Signals a client may pass to its job's programs (Ctrl-C kills the job instead).
SIGNALS = frozenset({1, 10, 12, 15})  # SIGHUP, SIGUSR1, SIGUSR2, SIGTERM


def signal_number(v: Any) -> int:
    if type(v) is not int or v not in SIGNALS:
        raise _fail(f"not a signal a job may be sent ({sorted(SIGNALS)})")
    return v


@_kind(24, _job_id_or_empty, signal_number)
@frame
class Signal(Frame):
    """Deliver ``signum`` to the job's programs on every node below."""

    job: str
    signum: int


PHASES = ("start", "run")


def phase(v: Any) -> str:
    if v not in PHASES:
        raise _fail(f"not one of {PHASES}")
    return v


@_kind(25, job_id, texts(), phase)
@frame
class Late(Frame):
    """Nodes that timed out: "start" (-t: never started the program) or "run" (-u: killed)."""

    job: str
    nodes: list[str]
    phase: str


@_kind(26, texts(), flag)
@frame
class Drain(Frame):
    """Client (gproc-deploy, as root or the master's user) to master: new jobs leave these
    nodes out, with the reason, while ``on``; the master answers with the jobs still on them."""

    nodes: list[str]
    on: bool


@_kind(27, texts())
@frame
class Draining(Frame):
    """Master to client: the running jobs (ids) that still use a node being drained."""

    busy: list[str]


@_kind(20)
@frame
class Info(Frame):
    """Client to master: send me the tree."""


def job_rows(v: Any) -> list[list[Any]]:
    """Running jobs as ``gproc i`` lists them: [job id, user, program, spec, seconds]."""
    if type(v) is not list or len(v) > MAX_NODES:
        raise _fail(f"not a list of at most {MAX_NODES} jobs")
    for row in v:
        if type(row) is not list or len(row) != 5:
            raise _fail("a job row is not [job, user, program, spec, seconds]")
        job_id(row[0])
        for item in row[1:4]:
            text(4096)(item)
        uint()(row[4])
    return v


@_kind(21, tree, job_rows)
@frame
class TreeReply(Frame):
    """Master to client: the whole tree, and the jobs running through it with their users."""

    tree: Tree
    jobs: list[list[Any]] = field(default_factory=list)


@_kind(22, texts(), texts())
@frame
class Plan(Frame):
    """Master to client: the nodes the spec selects, and what it names that cannot run."""

    nodes: list[str]
    unreachable: list[str]


@_kind(23, text(1 << 16), texts())
@frame
class Error(Frame):
    """Master to client: the job is refused, and why."""

    message: str
    unreachable: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the job header's rules


def check_job(header: JobHeader) -> None:
    """The rules of a job header beyond field types; BadJob naming the first one broken."""

    def bad(reason: str) -> BadJob:
        return BadJob(header.job, reason)

    if not header.argv:
        raise bad("argv is empty")
    if header.mode not in MODES:
        raise bad(f"unknown mode {header.mode!r}")
    if header.mode not in ("local", "copy") and not header.prog:
        raise bad("no program to run (field prog)")
    if header.mode == "copy":
        if len(header.argv) < 2 or not header.private:
            raise bad("a copy names a destination and sources, and is staged (private)")
        for source in header.argv[1:]:
            if not source.startswith("/") or "/../" in source + "/" or source == "/":
                raise bad(f"copy source {source[:80]!r} is not a clean absolute path")
    for name in ("prog", "interp", "cwd"):
        value = getattr(header, name)
        if (value or name == "cwd") and (
            not value.startswith("/") or "/../" in value + "/" or "/./" in value + "/"
        ):
            raise bad(f"field {name} {value[:80]!r} is not a clean absolute path")
    for d in header.libdirs:
        if not d.startswith("/") or "/../" in d + "/":
            raise bad(f"library directory {d[:80]!r} is not a clean absolute path")
    from gproc import nodespec

    try:
        nodespec.parse(header.spec) if header.spec else ()
    except nodespec.SpecError as e:
        raise bad(str(e)) from None


# ---------------------------------------------------------------- the codec


def encode(frame: Frame) -> bytes:
    """A frame's body (no length prefix, no MAC: gproc.session adds those)."""
    if type(frame) is Data:
        digest = frame.digest or chunk_digest(frame.data)
        return data_prefix(frame.job, frame.index, digest) + frame.data
    if type(frame) is Hello:
        value: Any = {"t": "hello", "v": frame.version, "kind": frame.role, "nonce": frame.nonce}
    else:
        value = [frame.KIND, *(getattr(frame, f.name) for f in fields(frame))]
    body = msgpack.packb(value, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return body


def frame_bytes(frame: Frame) -> bytes:
    """Length prefix and body: a frame as it travels on an unauthenticated socket."""
    body = encode(frame)
    return LENGTH.pack(len(body)) + body


def _unpack(body: bytes) -> Any:
    # Every length is capped by the body itself, and every container by what a real frame
    # holds, so no input makes the decoder allocate far more than the bytes it was given.
    limit = len(body)
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=min(limit, 1 << 20),
            max_map_len=min(limit, 1 << 14),
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable frame: {type(e).__name__}") from None


def decode(body: bytes) -> Frame:
    """Bytes of one frame body as a checked frame, or ProtocolError (BadJob for a job)."""
    if body[:1] == b"\xc1":
        return _data(body)
    value = _unpack(body)
    if type(value) is dict:
        return _hello(value)
    if type(value) is not list or not value or type(value[0]) is not int:
        raise ProtocolError("frame is not an array starting with its kind")
    cls = KINDS.get(value[0])
    if cls is None:
        raise ProtocolError(f"unknown frame kind {value[0]}")
    args = value[1:]
    if len(args) != len(cls.CHECKS):
        raise ProtocolError(f"{cls.__name__} frame has {len(args)} fields, not {len(cls.CHECKS)}")
    checked = []
    for f, check, arg in zip(fields(cls), cls.CHECKS, args, strict=True):
        try:
            checked.append(check(arg))
        except ProtocolError as e:
            if cls is JobHeader and f.name != "job" and type(args[0]) is str:
                raise BadJob(args[0], f"field {f.name}: {e}") from None
            raise ProtocolError(f"{cls.__name__} frame, field {f.name}: {e}") from None
    frame = cls(*checked)
    if cls is JobHeader:
        check_job(frame)  # type: ignore[arg-type]
    return frame


def _hello(value: dict[Any, Any]) -> Hello:
    version = value.get("v")
    if version != VERSION:
        raise VersionMismatch(
            f"peer speaks protocol version {version!r}, this daemon {VERSION}: "
            "run the same gproc on both (gproc-deploy up copies it)"
        )
    if value.get("t") != "hello":
        raise ProtocolError("a map frame that is not a hello")
    role, nonce = value.get("kind"), value.get("nonce")
    if type(role) is not str or len(role) > 32:
        raise ProtocolError("hello without a role")
    if type(nonce) is not bytes or len(nonce) != NONCE:
        raise ProtocolError("hello with a bad nonce")
    return Hello(version, role, nonce)


def legacy_error(message: str) -> bytes:
    """An error as a protocol-1 client reads it, so an old ``gproc e`` prints why."""
    body = msgpack.packb({"t": "error", "message": message}, use_bin_type=True)
    return LENGTH.pack(len(body)) + body
