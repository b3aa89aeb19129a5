"""Authenticated sessions between daemons: the handshake and a MAC on every later frame.

Every TCP link of the tree starts with a handshake on the shared cluster key (the idea of
MUNGE and of SSH's MAC layer; docs/PROTOCOL.md has the byte-level description):

1. the dialer sends a hello with a fresh 32-byte nonce, the acceptor answers with its own;
2. both derive, HKDF-style, a secret from the cluster key and both nonces, bound to the
   transcript (the exact bytes of both hellos);
3. the dialer proves it holds the key first; the acceptor checks that proof before it sends
   its own. A daemon that accepts connections therefore hands nothing to a peer that has not
   proved the key, and a proof is bound to one transcript, so it is worth nothing elsewhere;
4. each direction then gets its own key, and every frame after the handshake carries an
   HMAC-SHA256 over the direction's implicit sequence number, the length and the SHA-256 of
   the body. A forged, replayed, reordered or dropped frame fails the MAC and closes the link.

The MAC covers the body's SHA-256 rather than the body itself so that a rack master sending
one 256 KiB chunk to 19 children hashes it once, then computes 19 small HMACs: with the MAC
over the whole body, HMAC took a third of a rack master's time while it shipped a 32 MiB file
and the shipment took twice as long as without MACs (bench/bench_ship.py). HMAC-SHA256 was
chosen over keyed BLAKE2b by measurement (256 KiB frames: 2.1 GB/s against 1.3 GB/s here;
bench/bench_mac.py), and SHA-256 for the body digest for the same reason. A relay that
forwards the bytes honestly can only forward them; confidentiality is not provided
(PROTOCOL.md says what an observer sees).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import TYPE_CHECKING

from gproc.protocol import (
    LENGTH,
    MAC,
    VERSION,
    Hello,
    Proof,
    ProtocolError,
    VersionMismatch,
    data_prefix_length,
    encode,
)
from gproc.stream import within

if TYPE_CHECKING:
    from gproc.stream import Conn

HANDSHAKE_TIMEOUT = 5.0
SEQ = struct.Struct(">Q")
LABEL = b"gproc v3 "


def _expand(prk: bytes, label: bytes, transcript: bytes) -> bytes:
    """HKDF-Expand (RFC 5869) for one 32-byte output: HMAC(prk, info || 0x01)."""
    return hmac.digest(prk, LABEL + label + transcript + b"\x01", "sha256")


class Secrets:
    """What one handshake derives: the two proofs and the two direction keys."""

    def __init__(self, key: bytes, dialer_hello: bytes, acceptor_hello: bytes, nonces: bytes):
        prk = hmac.digest(nonces, key, "sha256")  # HKDF-Extract, salt = both nonces
        transcript = hashlib.sha256(dialer_hello + b"|" + acceptor_hello).digest()
        self.dialer_proof = _expand(prk, b"dialer proof", transcript)
        self.acceptor_proof = _expand(prk, b"acceptor proof", transcript)
        self.dialer_to_acceptor = _expand(prk, b"dialer to acceptor", transcript)
        self.acceptor_to_dialer = _expand(prk, b"acceptor to dialer", transcript)


def body_digest(body: bytes | memoryview) -> bytes:
    """What a frame's MAC covers of its body: its SHA-256 (see the module docstring), or for
    a data frame the SHA-256 of its prefix, which holds the chunk's own SHA-256: the receiver
    checks that against the bytes (gproc.protocol decodes no data frame that fails it), so
    the chunk is hashed once per hop and not at all to forward it."""
    prefix = data_prefix_length(body)
    return hashlib.sha256(body[:prefix] if prefix else body).digest()


class Session:
    """One link's MAC state after the handshake: a key and a sequence number per direction."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._send = hmac.new(send_key, digestmod="sha256")
        self._recv = hmac.new(recv_key, digestmod="sha256")
        self.sent = 0
        self.received = 0

    def seal(self, body: bytes) -> bytes:
        """Length, body and MAC: one frame ready for the socket."""
        head, mac = self.seal_parts(len(body), body_digest(body))
        return head + body + mac

    def seal_parts(self, size: int, digest: bytes) -> tuple[bytes, bytes]:
        """The length word and the MAC that go before and after a body of ``size`` bytes
        whose :func:`body_digest` is ``digest`` (a hop sending one chunk to many children
        computes it once)."""
        head = LENGTH.pack(size + MAC)
        mac = self._send.copy()
        mac.update(SEQ.pack(self.sent) + head + digest)
        self.sent += 1
        return head, mac.digest()

    def open(self, head: bytes, payload: bytes) -> memoryview:
        """The body of a received frame once its MAC checks out; ProtocolError otherwise."""
        if len(payload) < MAC:
            raise ProtocolError("frame too short to carry a MAC")
        view = memoryview(payload)
        body = view[:-MAC]
        mac = self._recv.copy()
        mac.update(SEQ.pack(self.received) + head + body_digest(body))
        if not hmac.compare_digest(mac.digest(), view[-MAC:]):
            raise ProtocolError(
                f"bad MAC on frame {self.received} of the session "
                "(forged, replayed, reordered or altered on the way)"
            )
        self.received += 1
        return body


async def handshake(conn: Conn, key: bytes, dialer: bool, role: str) -> Hello:
    """Run the handshake on ``conn`` and switch it to MACed frames; returns the peer's hello.

    ``role`` names this end in its hello (logs only). Raises ProtocolError when the peer is
    not of this cluster, speaks another version, or breaks the protocol, and TimeoutError
    after HANDSHAKE_TIMEOUT seconds.
    """
    return await within(_handshake(conn, key, dialer, role), HANDSHAKE_TIMEOUT)


async def _handshake(conn: Conn, key: bytes, dialer: bool, role: str) -> Hello:
    mine = Hello(VERSION, role, secrets.token_bytes(32))
    my_body = encode(mine)
    if dialer:
        conn.write_body(my_body)
    try:
        their_body, theirs = await conn.recv_raw()
    except VersionMismatch:
        if not dialer:  # our hello tells a peer of another version which one we speak
            conn.write_body(my_body)
        raise
    if not isinstance(theirs, Hello):
        raise ProtocolError("peer did not say hello")
    if theirs.nonce == mine.nonce:
        raise ProtocolError("peer reflected our nonce")
    if not dialer:
        conn.write_body(my_body)
    d_body, a_body = (my_body, their_body) if dialer else (their_body, my_body)
    d_nonce, a_nonce = (mine.nonce, theirs.nonce) if dialer else (theirs.nonce, mine.nonce)
    derived = Secrets(key, d_body, a_body, d_nonce + a_nonce)
    if dialer:
        conn.write_body(encode(Proof(derived.dialer_proof)))
        await _expect_proof(conn, derived.acceptor_proof)
        conn.start_session(Session(derived.dialer_to_acceptor, derived.acceptor_to_dialer))
    else:
        await _expect_proof(conn, derived.dialer_proof)
        conn.write_body(encode(Proof(derived.acceptor_proof)))
        conn.start_session(Session(derived.acceptor_to_dialer, derived.dialer_to_acceptor))
    await conn.drain()
    return theirs


async def _expect_proof(conn: Conn, expected: bytes) -> None:
    _, proof = await conn.recv_raw()
    if not isinstance(proof, Proof):
        raise ProtocolError("peer did not prove the cluster key")
    if not hmac.compare_digest(proof.mac, expected):
        raise ProtocolError("peer does not hold the cluster key")
