"""The relay both the master and every slave run: children, the jobs passing through, fan-out.

A hop holds the live children that registered with it. A job arrives from upstream (the exec
client for the master, the parent for a slave) as a header, then file chunks. The hop matches
the node spec against its live children, sends each selected child the header with that
child's sub-spec, and forwards every chunk to them as it arrives, so a deep tree costs about
one transfer time. Frames coming up from children (output, exits, losses) are passed upward
unchanged on the hop's one upstream connection; a child that disappears mid-job is reported
upward as a loss of every node it was to run on that has not yet reported an exit.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gproc import nodespec
from gproc.stream import HEARTBEAT, Conn, connection_handler, handshake, keep_alive
from gproc.wire import Frame, ProtocolError, Tree, encode

log = logging.getLogger("gproc.relay")


@dataclass(eq=False)
class Child:
    """A child daemon as its parent sees it: its connection and what lies below it."""

    conn: Conn
    node_id: int
    name: str
    addr: str
    below: list[Tree] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)
    leaving: bool = False  # said bye: it was stopped, not lost

    def tree(self) -> Tree:
        return {
            "id": self.node_id,
            "name": self.name,
            "addr": self.addr,
            "state": "up",
            "children": self.below,
        }


MAX_DEPTH = 16


def check_trees(trees: object, depth: int = 0) -> list[Tree]:
    """A child's view of its subtree, checked field by field: it reaches every client."""
    if not isinstance(trees, list) or depth > MAX_DEPTH:
        raise ProtocolError("bad subtree in a register or tree frame")
    for t in trees:
        if not (
            isinstance(t, dict)
            and isinstance(t.get("id"), int)
            and all(isinstance(t.get(k), str) for k in ("name", "addr", "state"))
        ):
            raise ProtocolError("bad node in a register or tree frame")
        check_trees(t.get("children"), depth + 1)
    return trees


def expand(spec: nodespec.Spec, trees: list[Tree]) -> list[str]:
    """Names of the live nodes that ``spec`` selects among ``trees``, depth first."""
    live = {t["id"]: t for t in trees if t.get("state") == "up"}
    names: list[str] = []
    for node_id, sub in sorted(nodespec.select(spec, live).items()):
        names.append(live[node_id]["name"])
        names.extend(expand(sub, live[node_id]["children"]))
    return names


def unreachable(spec: nodespec.Spec, trees: list[Tree], where: str) -> list[str]:
    """What ``spec`` selects that cannot run: known nodes that were lost, ids nobody has.

    A lost node stays in its parent's tree (state "lost") until it registers again, so a
    spec like ``1/.`` names it instead of quietly running on the nodes that are left.
    """
    known = {t["id"]: t for t in trees}
    absent = nodespec.missing(spec, known)
    out = [f"{_ids(absent)} under {where} (no such node)"] if absent else []
    for node_id, sub in sorted(nodespec.select(spec, known).items()):
        tree = known[node_id]
        if tree.get("state") != "up":
            out.append(f"{tree['name']} ({tree.get('state')})")
        else:
            out.extend(unreachable(sub, tree["children"], tree["name"]))
    return out


def _ids(numbers: list[int]) -> str:
    """Sorted ids as ranges: [3, 4, 5, 9] -> "ids 3-5,9"."""
    return f"{'ids' if len(numbers) > 1 else 'id'} {nodespec.fold_numbers(numbers)}"


class Leg:
    """The part of a job that goes through one child: its sub-spec and who has reported."""

    def __init__(self, child: Child, spec: nodespec.Spec):
        self.child = child
        self.spec = spec
        # fixed now: a dying child may first tell us its own children are gone
        self.expected = [child.name, *expand(spec, child.below)]
        self.reported: set[str] = set()
        self.done = False
        self.need: asyncio.Future[set[int]] = asyncio.get_running_loop().create_future()

    def outstanding(self) -> list[str]:
        """Nodes of this leg that have neither exited nor been reported lost."""
        return [n for n in self.expected if n not in self.reported]


class Job:
    """One job as it passes through one hop."""

    def __init__(self, hop: Hop, jid: str, header: Frame, up: Conn, local: LocalRunner | None):
        self.hop = hop
        self.jid = jid
        self.header = header
        self.up = up
        self.local = local
        self.legs: dict[int, Leg] = {}
        self.finished = asyncio.Event()
        self.killed = False

    async def open_legs(self, spec: nodespec.Spec) -> None:
        """Send the header to every selected live child, each with its sub-spec."""
        chosen = [
            (self.hop.children[i], sub)
            for i, sub in nodespec.select(spec, self.hop.children).items()
        ]
        for child, sub in sorted(chosen, key=lambda pair: pair[0].node_id):
            node_id = child.node_id
            leg = Leg(child, sub)
            self.legs[node_id] = leg
            child.jobs[self.jid] = self
            frame = dict(self.header, job=self.jid, spec=nodespec.format_spec(sub))
            try:
                await child.conn.send(frame)
            except (ConnectionError, RuntimeError) as e:
                await self.leg_lost(leg, f"cannot send to {child.name}: {e}")

    async def open(self, spec: nodespec.Spec) -> None:
        await self.open_legs(spec)
        self.maybe_finish()

    async def needs(self) -> set[int]:
        """Manifest entries some node below (or this one) still needs the bytes of."""
        wanted = set(self.local.needed) if self.local is not None else set()
        for leg in list(self.legs.values()):
            wanted |= await leg.need
        return wanted

    async def feed(self, index: int, data: bytes) -> None:
        """Forward one chunk to the legs that need its file (all writes, then wait for all)."""
        raw = encode({"t": "data", "job": self.jid, "f": index, "b": data})
        legs = [
            leg
            for leg in self.legs.values()
            if not leg.done and leg.need.done() and index in leg.need.result()
        ]
        for leg in legs:
            if not leg.child.conn.closed:
                leg.child.conn.writer.write(raw)
        if self.local is not None and index in self.local.needed:
            self.local.feed(index, data)
        await asyncio.gather(*(leg.child.conn.drain() for leg in legs), return_exceptions=True)

    async def from_child(self, child: Child, frame: Frame) -> None:
        """Pass a child's frame upward, keeping account of who has reported."""
        leg = self.legs.get(child.node_id)
        if leg is None or leg.child is not child:
            return
        kind = frame["t"]
        if kind == "exit" and isinstance(frame.get("node"), str):
            leg.reported.add(frame["node"])
        elif kind == "lost" and isinstance(frame.get("nodes"), list):
            leg.reported.update(n for n in frame["nodes"] if isinstance(n, str))
        if kind == "need":
            files = frame.get("files")
            if not leg.need.done() and isinstance(files, list):
                leg.need.set_result({i for i in files if isinstance(i, int)})
            return
        if kind == "done":
            self._close_leg(leg)
            self.maybe_finish()
            return
        if kind in ("out", "exit", "lost"):
            await self.send_up(frame)

    @staticmethod
    def _close_leg(leg: Leg) -> None:
        """No more frames will come through this leg: it needs nothing more, either."""
        leg.done = True
        if not leg.need.done():
            leg.need.set_result(set())

    async def leg_lost(self, leg: Leg, reason: str) -> None:
        if leg.done:
            return
        self._close_leg(leg)
        nodes = leg.outstanding()
        leg.reported.update(nodes)
        log.warning("job %s: lost %s (%s)", self.jid, ",".join(nodes), reason)
        await self.send_up({"t": "lost", "job": self.jid, "nodes": nodes, "reason": reason})
        self.maybe_finish()

    async def send_up(self, frame: Frame) -> None:
        try:
            await self.up.send(frame)
        except (ConnectionError, RuntimeError):
            pass  # upstream gone: the kill path tears the job down

    def maybe_finish(self) -> None:
        if self.finished.is_set():
            return
        if all(leg.done for leg in self.legs.values()) and (self.local is None or self.local.done):
            self.finished.set()
            self.hop.jobs.pop(self.jid, None)
            for leg in self.legs.values():
                leg.child.jobs.pop(self.jid, None)
            if not self.killed:
                self.up.send_nowait({"t": "done", "job": self.jid})

    async def kill(self) -> None:
        """Cancel everywhere below: kill the local program and tell every open leg."""
        self.killed = True
        for leg in self.legs.values():
            if not leg.done:
                leg.child.conn.send_nowait({"t": "kill", "job": self.jid})
                self._close_leg(leg)
        if self.local is not None:
            await self.local.kill()
        self.maybe_finish()


class LocalRunner:
    """Runs the job on this node: what a slave plugs into its hop (see gproc.slave)."""

    done: bool = False
    needed: frozenset[int] = frozenset()

    def feed(self, index: int, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def kill(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Hop:
    """One point of the tree: serves children, relays jobs down and their frames up."""

    def __init__(
        self,
        name: str,
        node_id: int,
        key: bytes,
        on_tree_change: Callable[[], None] | None = None,
        heartbeat: float = HEARTBEAT,
    ):
        self.name = name
        self.heartbeat = heartbeat
        self.watchdog: asyncio.Task[None] | None = None
        self.node_id = node_id
        self.key = key
        self.children: dict[int, Child] = {}
        self.jobs: dict[str, Job] = {}
        self.lost: dict[int, Tree] = {}
        self.on_tree_change = on_tree_change
        self.server: asyncio.base_events.Server | None = None

    # ------------------------------------------------------------ the tree below

    def subtrees(self) -> list[Tree]:
        """Live children and the ones that left (state "lost"), ordered by id."""
        trees = {i: c.tree() for i, c in self.children.items()}
        for i, t in self.lost.items():
            trees.setdefault(i, t)
        return [trees[i] for i in sorted(trees)]

    def _changed(self) -> None:
        if self.on_tree_change is not None:
            self.on_tree_change()

    # ------------------------------------------------------------ children

    async def serve(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        children = lambda: [c.conn for c in self.children.values()]  # noqa: E731
        self.watchdog = asyncio.ensure_future(keep_alive(children, self.heartbeat, log))

    @connection_handler(log)
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        child: Child | None = None
        try:
            await handshake(conn, self.key, "accept", "parent")
            child = await self._register(conn)
            if child is not None:
                await self._child_loop(child)
        except (ProtocolError, asyncio.TimeoutError, ConnectionError) as e:
            log.warning(
                "dropped %s%s: %s",
                conn.peer(),
                f" ({child.name})" if child else "",
                e or type(e).__name__,
            )
        finally:
            await conn.close()
            if child is not None:
                await self._child_gone(child)

    async def _register(self, conn: Conn) -> Child | None:
        frame = await asyncio.wait_for(conn.recv(), 10)
        if frame is None or frame.get("t") != "register":
            raise ProtocolError("peer did not register")
        node_id, name, addr = frame.get("id"), frame.get("name"), frame.get("addr")
        below = check_trees(frame.get("children", []))
        if not (isinstance(node_id, int) and isinstance(name, str) and isinstance(addr, str)):
            raise ProtocolError("bad register frame")
        old = self.children.get(node_id)
        if old is not None and old.name != name:
            await conn.send(
                {"t": "refused", "reason": f"id {node_id} under {self.name} is taken by {old.name}"}
            )
            return None
        if old is not None:
            log.warning("%s registered again; dropping its old connection", name)
            await old.conn.close()
        child = Child(conn, node_id, name, addr, below)
        self.children[node_id] = child
        self.lost.pop(node_id, None)
        await conn.send({"t": "welcome", "parent": self.name})
        log.info("child %s (id %d, %s) registered", name, node_id, addr)
        self._changed()
        return child

    async def _child_loop(self, child: Child) -> None:
        while (frame := await child.conn.recv()) is not None:
            kind = frame["t"]
            if kind == "tree":
                child.below = check_trees(frame.get("children"))
                self._changed()
            elif kind in ("out", "exit", "lost", "done", "need"):
                job = child.jobs.get(frame.get("job"))
                if job is not None:
                    # while upstream is slow to take this frame we read nothing from the
                    # child: that is backpressure, not silence
                    child.conn.busy += 1
                    try:
                        await job.from_child(child, frame)
                    finally:
                        child.conn.busy -= 1
                        child.conn.last_heard = time.monotonic()
            elif kind == "bye":
                child.leaving = True
            elif kind != "ping":
                raise ProtocolError(f"unexpected {kind!r} frame from a child")

    async def _child_gone(self, child: Child) -> None:
        if self.children.get(child.node_id) is not child:
            return
        del self.children[child.node_id]
        if child.leaving:
            log.info("child %s (id %d) stopped", child.name, child.node_id)
        else:
            self.lost[child.node_id] = dict(child.tree(), state="lost", children=[])
            log.warning("child %s (id %d) is gone", child.name, child.node_id)
        for job in list(child.jobs.values()):
            leg = job.legs.get(child.node_id)
            if leg is not None:
                await job.leg_lost(leg, f"connection to {child.name} lost")
        self._changed()

    # ------------------------------------------------------------ jobs from upstream

    def new_job(
        self, header: Frame, up: Conn, local: LocalRunner | None, jid: str | None = None
    ) -> Job:
        job = Job(self, jid or secrets.token_hex(6), header, up, local)
        self.jobs[job.jid] = job
        return job

    async def start_job(
        self,
        header: Frame,
        up: Conn,
        local: LocalRunner | None,
        spec: nodespec.Spec,
        jid: str | None = None,
    ) -> Job:
        job = self.new_job(header, up, local, jid)
        await job.open(spec)
        return job

    async def close(self) -> None:
        for job in list(self.jobs.values()):
            await job.kill()
        if self.server is not None:
            self.server.close()
        if self.watchdog is not None:
            self.watchdog.cancel()
        for child in list(self.children.values()):
            await child.conn.close()


def check_header(header: dict[str, Any]) -> None:
    """The fields every hop relies on, with their types; raise ValueError naming the bad one."""
    wanted = {"argv": list, "mode": str, "cwd": str, "env": dict, "spec": str}
    for name, kind in wanted.items():
        if not isinstance(header.get(name), kind):
            raise ValueError(f"field {name!r} missing or not a {kind.__name__}")
    if not header["argv"] or not all(isinstance(a, str) for a in header["argv"]):
        raise ValueError("argv must be a non-empty list of strings")
    if header["mode"] not in ("loader", "env", "local", "direct"):
        raise ValueError(f"unknown mode {header['mode']!r}")
    if header["mode"] != "local" and not isinstance(header.get("prog"), str):
        raise ValueError("field 'prog' missing")
    if not all(isinstance(d, str) for d in header.get("libdirs", [])):
        raise ValueError("libdirs must be strings")
    env = header["env"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("env must map strings to strings")
    texts = [*header["argv"], *env, *env.values(), *header.get("libdirs", [])]
    texts += [header.get(k) or "" for k in ("cwd", "prog", "interp")]
    if any("\0" in t for t in texts if isinstance(t, str)):
        raise ValueError("a NUL byte in argv, env or a path")
    if any(not k or "=" in k for k in env):
        raise ValueError("an environment variable name is empty or holds '='")
    for name in ("prog", "interp", "cwd"):
        value = header.get(name)
        if isinstance(value, str) and (not value.startswith("/") or "/../" in value + "/"):
            raise ValueError(f"field {name!r} is not a clean absolute path")
