"""The relay both the master and every slave run: children, the jobs passing through, fan-out.

A hop holds the live children that registered with it. A job arrives from upstream (the exec
client for the master, the parent for a slave) as a header, then file chunks. The hop matches
the node spec against its live children, sends each selected child the header with that
child's sub-spec, and forwards every chunk to them as it arrives, so a deep tree costs about
one transfer time. Frames coming up from children (output, exits, losses) are passed upward
on the hop's one upstream connection; a child that disappears mid-job is reported upward as a
loss of every node it was to run on that has not yet reported an exit.

Many jobs share each link, so every job has its own window on every link it crosses (see
gproc.stream.Window and docs/PROTOCOL.md): a child sends a job's output only while the job's
window allows, and this hop gives the window back as it passes that output on; file chunks go
to a child only while its window for the job allows. No loop that reads a link ever waits on
a job: a frame that arrives is either handled at once or queued within the window its sender
was given. What one job buffers at a hop is bounded by ``(children + 1) * UP_WINDOW`` upward
and ``(children + 1) * DOWN_WINDOW`` downward. A reader that stops reading stops its own job
only: heartbeats and every other job go on.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gproc import nodespec, wire
from gproc.protocol import (
    Bye,
    Credit,
    Data,
    Done,
    Exit,
    Frame,
    Input,
    JobHeader,
    Kill,
    Late,
    Lost,
    Need,
    Out,
    Ping,
    ProtocolError,
    Refused,
    Register,
    Signal,
    Subtree,
    Tree,
    Welcome,
    data_prefix,
    encode,
)
from gproc.session import body_digest, handshake
from gproc.stream import (
    HEARTBEAT,
    Conn,
    RateLimited,
    Sealed,
    Window,
    charge,
    connection_handler,
    keep_alive,
    within,
)

log = logging.getLogger("gproc.relay")

UP_WINDOW = 256 << 10  # output bytes of one job a child may send before this hop passes them on
DOWN_WINDOW = 4 << 20  # file bytes of one job a parent may send before the child passes them on
MAX_OUT_FRAME = 1 << 20  # the largest output frame (gproc.protocol.Out)
MAX_UNAUTHENTICATED = 64  # connections still in their handshake; more are closed at once
REGISTER_TIMEOUT = 10.0


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


def expand(spec: nodespec.Spec, trees: list[Tree]) -> list[str]:
    """Names of the live nodes that ``spec`` selects among ``trees``, depth first."""
    live = {t["id"]: t for t in trees if t["state"] == "up"}
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
        if tree["state"] != "up":
            out.append(f"{tree['name']} ({tree['state']})")
        else:
            out.extend(unreachable(sub, tree["children"], tree["name"]))
    return out


def _ids(numbers: list[int]) -> str:
    """Sorted ids as ranges: [3, 4, 5, 9] -> "ids 3-5,9"."""
    return f"{'ids' if len(numbers) > 1 else 'id'} {nodespec.fold_numbers(numbers)}"


class Leg:
    """The part of a job that goes through one child: its sub-spec, windows, who reported."""

    def __init__(self, child: Child, spec: nodespec.Spec, only: frozenset[str] | None = None):
        self.child = child
        self.spec = spec
        # fixed now: a dying child may first tell us its own children are gone; with -w/-x
        # (``only``) the nodes on the way that only relay are not expected to report
        names = [child.name, *expand(spec, child.below)]
        self.expected = [n for n in names if only is None or n in only]
        self.reported: set[str] = set()
        self.done = False
        self.need: asyncio.Future[set[int]] = asyncio.get_running_loop().create_future()
        self.window = Window(DOWN_WINDOW)  # file bytes we may still send this child
        self.held = 0  # output bytes the child sent that we have not passed on yet
        self.owed = 0  # output bytes passed on that we have not credited back yet

    def outstanding(self) -> list[str]:
        """Nodes of this leg that have neither exited nor been reported lost."""
        return [n for n in self.expected if n not in self.reported]


LOCAL = None  # the source of a frame this hop's own program produced


class Job:
    """One job as it passes through one hop.

    Frames going up (this node's output and exit, the children's output, exits and losses,
    and finally ``done``) wait in one queue, in order; one task sends them upstream as the
    job's upstream window allows and credits each child for what has gone on.
    """

    def __init__(
        self,
        hop: Hop,
        jid: str,
        header: JobHeader,
        up: Conn,
        local: LocalRunner | None,
        up_window: Window | None,
    ):
        self.hop = hop
        self.jid = jid
        self.header = header
        self.only = frozenset(header.only) if header.only else None
        self.started = time.monotonic()
        self.nodes: list[str] = []  # the nodes it runs on (the master's plan)
        self.up = up
        self.local = local
        self.legs: dict[int, Leg] = {}
        self.finished = asyncio.Event()
        self.killed = False
        self.ending = False
        self.opening = False
        self.up_window = up_window  # None: upstream is a client socket, its drain is enough
        self.local_window = Window(UP_WINDOW)
        self.queue: collections.deque[tuple[Frame, Leg | None, int]] = collections.deque()
        self.queued = asyncio.Event()
        self.pump = asyncio.get_running_loop().create_task(self._pump_up())

    # ------------------------------------------------------------ downward

    async def open_legs(self, spec: nodespec.Spec) -> None:
        """Send the header to every selected live child, each with its sub-spec."""
        chosen = [
            (self.hop.children[i], sub)
            for i, sub in nodespec.select(spec, self.hop.children).items()
        ]
        bodies: dict[nodespec.Spec, bytes] = {}
        for child, sub in sorted(chosen, key=lambda pair: pair[0].node_id):
            leg = Leg(child, sub, self.only)
            self.legs[child.node_id] = leg
            child.jobs[self.jid] = self
            if sub not in bodies:
                header = dataclasses.replace(
                    self.header, job=self.jid, spec=nodespec.format_spec(sub)
                )
                bodies[sub] = encode(header)
            try:
                child.conn.write_body(bodies[sub])
            except (ConnectionError, RuntimeError) as e:
                self.leg_lost(leg, f"cannot send to {child.name}: {e}")
        # no drain: a header is small, and waiting on one slow child here would stop the
        # caller (a slave's loop reading its parent) from reading for every job

    async def open(self, spec: nodespec.Spec) -> None:
        self.opening = True  # a leg lost while others are still being opened ends nothing
        try:
            await self.open_legs(spec)
        finally:
            self.opening = False
        self.maybe_finish()

    async def needs(self) -> set[int]:
        """Manifest entries some node below (or this one) still needs the bytes of."""
        wanted = set(await self.local.needs()) if self.local is not None else set()
        for leg in list(self.legs.values()):
            wanted |= await leg.need
        return wanted

    async def forward(self, chunks: list[Data]) -> None:
        """Send chunks to the legs that need their files, each as its window allows.

        A chunk goes on as it came: its bytes and sha256 untouched, under a new prefix (the
        job id a client leaves empty is filled in), whose digest is all the MACs cover.
        What the legs may take now is gathered and written in one go per leg (a batch of
        small files costs one system call per child, not one per file and child); when a
        leg's window is empty, everything gathered is written before waiting for credit.
        """
        gathered: dict[Leg, list[Sealed]] = {}
        for chunk in chunks:
            legs = [
                leg
                for leg in self.legs.values()
                if not leg.done and leg.need.done() and chunk.index in leg.need.result()
            ]
            if not legs:
                continue
            prefix = data_prefix(self.jid, chunk.index, chunk.digest)
            sealed, cost = ((prefix, chunk.data), body_digest(prefix)), charge(len(chunk.data))
            for leg in legs:
                if not leg.window.try_take(cost):
                    self._write_all(gathered)
                    await leg.window.take(cost)
                gathered.setdefault(leg, []).append(sealed)
        self._write_all(gathered)
        await self._drain_legs(list(self.legs.values()))

    async def forward_input(self, data: bytes) -> None:
        """The client's standard input to every open leg, each as its window allows."""
        if all(leg.done for leg in self.legs.values()):
            return  # a leaf, or every leg finished: nothing to seal
        body = encode(Input(self.jid, data))
        sealed: Sealed = ((body,), body_digest(body))
        cost = charge(len(data))
        legs = [leg for leg in self.legs.values() if not leg.done]
        for leg in legs:
            await leg.window.take(cost)
            if not leg.done:
                try:
                    leg.child.conn.write_bodies([sealed])
                except (ConnectionError, RuntimeError):
                    pass  # the child loop notices and reports the leg lost
        await self._drain_legs(legs)

    def signal(self, signum: int) -> None:
        """Pass a signal to the job's programs: this node's, and every open leg's."""
        for leg in self.legs.values():
            if not leg.done:
                leg.child.conn.send_nowait(Signal(self.jid, signum))
        if self.local is not None:
            self.local.signal(signum)

    @staticmethod
    def _write_all(gathered: dict[Leg, list[Sealed]]) -> None:
        for leg, bodies in gathered.items():
            if bodies and not leg.done:
                try:
                    leg.child.conn.write_bodies(bodies)
                except (ConnectionError, RuntimeError):
                    pass  # the child loop notices and reports the leg lost
        gathered.clear()

    @staticmethod
    async def _drain_legs(legs: list[Leg]) -> None:
        await asyncio.gather(*(leg.child.conn.drain() for leg in legs), return_exceptions=True)

    # ------------------------------------------------------------ upward

    def from_child(self, child: Child, frame: Frame) -> None:
        """Handle a child's frame of this job at once; never waits (the child loop calls it)."""
        leg = self.legs.get(child.node_id)
        if leg is None or leg.child is not child:
            return
        kind = type(frame)
        if kind is Credit:
            leg.window.give(frame.size)
        elif kind is Out:
            cost = charge(len(frame.data))
            leg.held += cost
            if leg.held > UP_WINDOW + charge(MAX_OUT_FRAME):
                raise ProtocolError(f"{child.name} overran job {self.jid}'s output window")
            self.send_up(frame, leg, cost)
        elif kind is Exit:
            leg.reported.add(frame.node)
            self.send_up(frame, leg)
        elif kind is Lost:
            leg.reported.update(frame.nodes)
            self.send_up(frame, leg)
        elif kind is Late:
            self.send_up(frame, leg)
        elif kind is Need:
            if not leg.need.done():
                leg.need.set_result(set(frame.files))
        elif kind is Done:
            self._close_leg(leg)
            self.maybe_finish()

    def send_up(self, frame: Frame, source: Leg | None = LOCAL, cost: int = 0) -> None:
        """Queue a frame for upstream, behind everything of this job queued before it."""
        if self.killed:
            return
        self.queue.append((frame, source, cost))
        self.queued.set()

    async def _pump_up(self) -> None:
        """Send the job's queued frames upstream in order, under the job's window."""
        while True:
            if not self.queue:
                self._pay_credits()
                self.queued.clear()
                await self.queued.wait()
                continue
            frame, source, cost = self.queue.popleft()
            if cost and self.up_window is not None:
                await self.up_window.take(cost)
            try:
                self.up.write(frame)
                await self.up.drain()
            except (ConnectionError, RuntimeError):
                return  # upstream gone: the kill path tears the job down
            if source is LOCAL:
                self.local_window.give(cost)
            elif cost:
                source.held -= cost
                source.owed += cost
                if source.owed >= UP_WINDOW // 4:
                    self._credit(source)
            if type(frame) is Done:
                self._finished()
                return

    def _pay_credits(self) -> None:
        for leg in self.legs.values():
            if leg.owed:
                self._credit(leg)

    def _credit(self, leg: Leg) -> None:
        leg.child.conn.send_nowait(Credit(self.jid, leg.owed))
        leg.owed = 0

    @staticmethod
    def _close_leg(leg: Leg) -> None:
        """No more frames will come through this leg: it needs nothing more, either."""
        leg.done = True
        leg.window.close()
        if not leg.need.done():
            leg.need.set_result(set())

    def leg_lost(self, leg: Leg, reason: str) -> None:
        if leg.done:
            return
        self._close_leg(leg)
        nodes = leg.outstanding()
        leg.reported.update(nodes)
        log.warning("job %s: lost %s (%s)", self.jid, ",".join(nodes), reason)
        self.send_up(Lost(self.jid, nodes, reason))
        self.maybe_finish()

    def maybe_finish(self) -> None:
        """Once every leg and the local run are over, queue ``done`` behind their frames."""
        if self.ending or self.killed or self.opening:
            return
        if all(leg.done for leg in self.legs.values()) and (self.local is None or self.local.done):
            self.ending = True
            self.send_up(Done(self.jid))

    def _finished(self) -> None:
        if self.finished.is_set():
            return
        self.finished.set()
        self.hop.jobs.pop(self.jid, None)
        for leg in self.legs.values():
            leg.child.jobs.pop(self.jid, None)
            leg.window.close()
        self.local_window.close()
        if self.up_window is not None:
            self.up_window.close()

    async def kill(self) -> None:
        """Cancel everywhere below: kill the local program and tell every open leg."""
        if self.killed:
            return
        self.killed = True
        self.queue.clear()
        self.pump.cancel()
        for leg in self.legs.values():
            if not leg.done:
                leg.child.conn.send_nowait(Kill(self.jid))
                self._close_leg(leg)
        self._finished()
        if self.local is not None:
            await self.local.kill()


class LocalRunner:
    """Runs the job on this node: what a slave plugs into its hop (see gproc.slave)."""

    done: bool = False

    async def needs(self) -> frozenset[int]:  # pragma: no cover - interface
        raise NotImplementedError

    async def kill(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def signal(self, signum: int) -> None:  # pragma: no cover - interface
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
        self.unauthenticated = 0
        self.refused = RateLimited(log)

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
        self.server = await wire.start_server(self._accept, host, port, reuse_address=True)
        children = lambda: [c.conn for c in self.children.values()]  # noqa: E731
        self.watchdog = asyncio.ensure_future(keep_alive(children, self.heartbeat, log))

    @connection_handler(log)
    async def _accept(self, reader: wire.FrameReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        if self.unauthenticated >= MAX_UNAUTHENTICATED:
            self.refused.warn(
                "%d connections are still proving the key; closing %s at once",
                self.unauthenticated,
                conn.peer(),
            )
            await conn.close()
            return
        child: Child | None = None
        try:
            self.unauthenticated += 1
            try:
                await handshake(conn, self.key, dialer=False, role="parent")
            finally:
                self.unauthenticated -= 1
            child = await self._register(conn)
            if child is not None:
                await self._child_loop(child)
        except (ProtocolError, asyncio.TimeoutError, ConnectionError) as e:
            why = str(e) or type(e).__name__
            if child is None:
                self.refused.warn("refused %s: %s", conn.peer(), why)
            else:
                log.warning("dropped %s (%s): %s", conn.peer(), child.name, why)
        finally:
            if child is not None:
                self._child_gone(child)  # first: its jobs must not wait on the close
            await conn.close()

    async def _register(self, conn: Conn) -> Child | None:
        frame = await within(conn.recv(), REGISTER_TIMEOUT)
        if type(frame) is not Register:
            raise ProtocolError("peer did not register")
        old = self.children.get(frame.node_id)
        if old is not None and old.name != frame.name:
            reason = f"id {frame.node_id} under {self.name} is taken by {old.name}"
            await conn.send(Refused(reason))
            log.warning("refused %s as id %d: %s", frame.name, frame.node_id, reason)
            return None
        if old is not None:
            log.warning("%s registered again; dropping its old connection", frame.name)
            await old.conn.close()
        child = Child(conn, frame.node_id, frame.name, frame.addr, frame.children)
        self.children[child.node_id] = child
        self.lost.pop(child.node_id, None)
        await conn.send(Welcome(self.name))
        log.info("child %s (id %d, %s) registered", child.name, child.node_id, child.addr)
        self._changed()
        return child

    async def _child_loop(self, child: Child) -> None:
        """Read a child's frames; nothing here waits on a job (see the module docstring)."""
        while (frame := await child.conn.recv()) is not None:
            kind = type(frame)
            if kind in (Out, Exit, Lost, Late, Need, Done, Credit):
                job = child.jobs.get(frame.job)
                if job is not None:
                    job.from_child(child, frame)
            elif kind is Subtree:
                child.below = frame.children
                self._changed()
            elif kind is Bye:
                child.leaving = True
            elif kind is not Ping:
                raise ProtocolError(f"unexpected {kind.__name__} frame from a child")

    def _child_gone(self, child: Child) -> None:
        """A child's connection ended: its legs are lost, and, unless it has registered
        again meanwhile (a new connection took its place), so is its place in the tree."""
        current = self.children.get(child.node_id) is child
        if current:
            del self.children[child.node_id]
            if child.leaving:
                log.info("child %s (id %d) stopped", child.name, child.node_id)
            else:
                self.lost[child.node_id] = dict(child.tree(), state="lost", children=[])
                log.warning("child %s (id %d) is gone", child.name, child.node_id)
        for job in list(child.jobs.values()):
            leg = job.legs.get(child.node_id)
            if leg is not None and leg.child is child:
                job.leg_lost(leg, f"connection to {child.name} lost")
        if current:
            self._changed()

    # ------------------------------------------------------------ jobs from upstream

    def new_job(
        self,
        header: JobHeader,
        up: Conn,
        local: LocalRunner | None,
        jid: str | None = None,
        up_window: Window | None = None,
    ) -> Job:
        job = Job(self, jid or secrets.token_hex(6), header, up, local, up_window)
        self.jobs[job.jid] = job
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
