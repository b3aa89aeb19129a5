"""The bare tree: a file sent down gproc's tree with nothing but sockets and files.

    python3 bare_tree.py serve PORT               on every node, until it is killed
    python3 bare_tree.py send TREE SRC DEST PORT [sha256]  on the front-end

TREE is a JSON file mapping each rack master's address to its nodes' addresses. This is the
floor that ``bench_peers.py`` prints beside the tools, not a tool: every node reads the file
from its parent in 1 MiB pieces, writes it to DEST and passes each piece to its children
(one thread a child), and answers its parent with one byte once its copy is written and
every child has answered. No framing, no authentication, no digest, no flow control but
TCP's and no program to run: what any copy through this tree must spend at least, on the
same containers, network and file systems. With ``sha256`` every node (the front-end too)
also hashes every piece once, as gproc's nodes check every chunk: the floor with the one
pass over the bytes that gproc's trust model adds. Standard library only: it runs in the
images as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import sys
import threading
import time

CHUNK = 1 << 20
DONE = b"k"
CONNECT = 30.0  # seconds to wait for a child's server to be listening


def read_exact(sock: socket.socket, size: int) -> bytearray:
    """``size`` bytes from ``sock``; ConnectionError if it ends first."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"the parent closed {got} bytes into a {size}-byte piece")
        got += n
    return buf


def read_header(sock: socket.socket) -> dict:
    """The JSON line a parent sends first: size, dest, the child's own children, port."""
    line = b""
    while not line.endswith(b"\n"):
        part = sock.recv(1)
        if not part:
            raise ConnectionError("the parent closed before its header")
        line += part
    return json.loads(line)


def dial(address: str, port: int) -> socket.socket:
    """A connection to a child's server, waiting for it to listen."""
    deadline = time.monotonic() + CONNECT
    while True:
        try:
            link = socket.create_connection((address, port), timeout=CONNECT)
            link.settimeout(None)
            return link
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def forward(link: socket.socket, feed: queue.SimpleQueue) -> None:
    """Send what the feed gives to one child until it gives None."""
    while (piece := feed.get()) is not None:
        link.sendall(piece)


def relay(
    source,
    size: int,
    dest: str,
    children: dict[str, list[str]],
    port: int,
    here: bool,
    digest: bool,
) -> None:
    """Read ``size`` bytes from ``source`` (a socket or a file), hash each piece when
    ``digest``, write them to ``dest`` when ``here``, pass them to every child (address ->
    its own children); return when every child has answered."""
    links, feeds, senders = [], [], []
    for address, below in children.items():
        link = dial(address, port)
        ask = {"size": size, "dest": dest, "children": below, "port": port, "digest": digest}
        link.sendall(json.dumps(ask).encode() + b"\n")
        feed: queue.SimpleQueue = queue.SimpleQueue()
        sender = threading.Thread(target=forward, args=(link, feed), daemon=True)
        sender.start()
        links.append(link)
        feeds.append(feed)
        senders.append(sender)
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if here else None
    left = size
    while left:
        want = min(CHUNK, left)
        piece = read_exact(source, want) if isinstance(source, socket.socket) else source.read(want)
        if len(piece) != want:
            raise OSError(f"{len(piece)} bytes where {want} were due")
        left -= want
        if digest:
            hashlib.sha256(piece).digest()
        for feed in feeds:
            feed.put(piece)
        if out is not None:
            view = memoryview(piece)
            while view:
                view = view[os.write(out, view) :]
    if out is not None:
        os.close(out)
    for feed in feeds:
        feed.put(None)
    for sender, link in zip(senders, links, strict=True):
        sender.join()
        if link.recv(1) != DONE:
            raise ConnectionError(f"child {link.getpeername()[0]} did not answer")
        link.close()


def serve(port: int) -> None:
    """One transfer after another, each from a parent that connects; errors end only it."""
    listener = socket.create_server(("", port))
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                ask = read_header(conn)
                below = {child: [] for child in ask["children"]}
                relay(conn, ask["size"], ask["dest"], below, ask["port"], True, ask["digest"])
                conn.sendall(DONE)
            except (OSError, ValueError, KeyError) as e:
                print(f"bare_tree: {e}", file=sys.stderr, flush=True)


def send(tree_file: str, src: str, dest: str, port: int, digest: bool) -> None:
    with open(tree_file) as f:
        tree = json.load(f)
    with open(src, "rb") as data:
        relay(data, os.fstat(data.fileno()).st_size, dest, tree, port, False, digest)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(int(sys.argv[2]))
    elif sys.argv[1:2] == ["send"] and len(sys.argv) in (6, 7) and sys.argv[6:] in ([], ["sha256"]):
        send(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:] == ["sha256"])
    else:
        sys.exit(__doc__)
