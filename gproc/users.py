"""Whose job it is and who may use a tree: peer credentials, the -allow policy, run-as.

One daemon tree may serve many users, as Slurm's and Flux's do. The master learns who a
client is from the kernel (``SO_PEERCRED`` on its Unix socket), never from the client's
words, and stamps that user (name, uid, gid) into the job header; the hops below trust the
stamp because every frame between daemons is authenticated. Each node then looks the name
up in its own user database (NSS) and runs the program as that user, or refuses on that node
with the reason. A daemon that is not root can run jobs only as itself: a personal tree.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass

from gproc.errors import GprocError

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class AllowError(GprocError):
    """A bad -allow value, or a group that does not exist; the message says which."""


class UserRefused(GprocError):
    """This node will not run the job as its user; the message says why (shown per node)."""


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a Unix socket, as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    return Peer(*_CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)))


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def describe(uid: int) -> str:
    """``uid 1001 (alice)`` for messages; the number alone when it has no name."""
    name = user_name(uid)
    return f"uid {uid} ({name})" if name else f"uid {uid}"


# ---------------------------------------------------------------- who may use a tree


@dataclass(frozen=True)
class Allow:
    """Who may use a master: ``owner`` (its own user), ``all``, or ``group:NAME``.

    The socket's mode says it to the kernel (0600, 0666, 0660 with the group); the master
    checks each client's credentials again, so a mode changed by hand opens nothing more.
    Root may always connect.
    """

    kind: str = "owner"
    group: str = ""
    gid: int = -1

    @classmethod
    def parse(cls, text: str) -> Allow:
        if text in ("owner", "all"):
            return cls(text)
        kind, _, name = text.partition(":")
        if kind != "group" or not name:
            raise AllowError(f"-allow {text!r}: use owner, all or group:NAME")
        try:
            return cls("group", name, grp.getgrnam(name).gr_gid)
        except KeyError:
            raise AllowError(f"-allow {text}: no group {name!r} on this machine") from None

    @property
    def mode(self) -> int:
        return {"owner": 0o600, "all": 0o666, "group": 0o660}[self.kind]

    def __str__(self) -> str:
        return f"group:{self.group}" if self.kind == "group" else self.kind

    def refusal(self, peer: Peer, name: str) -> str | None:
        """Why this client may not use the tree, or None when it may."""
        me = os.geteuid()
        if peer.uid in (0, me) or self.kind == "all":
            return None
        if self.kind == "group" and (
            peer.gid == self.gid or self.gid in os.getgrouplist(name, peer.gid)
        ):
            return None
        owner = user_name(me) or str(me)
        allowed = f"members of {self.group}" if self.kind == "group" else owner
        return (
            f"this tree serves {allowed} only (master started with -allow {self}); "
            f"ask {owner} to restart it with -allow all or -allow group:NAME"
        )


# ---------------------------------------------------------------- running as the user


@dataclass(frozen=True)
class RunAs:
    """The user a node runs a job as, from this node's own user database."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @property
    def switches(self) -> bool:
        """True when the program must drop from the daemon's user (root) to this one."""
        return os.geteuid() == 0 and self.uid != 0

    def env(self) -> dict[str, str]:
        """What a login would set; a job's own (shipped) values win over these."""
        return {
            "USER": self.name,
            "LOGNAME": self.name,
            "HOME": self.home,
            "SHELL": self.shell,
            "PATH": DEFAULT_PATH,
        }


def resolve(name: str, uid: int, gid: int, node: str) -> RunAs:
    """The job's user as this node knows it; UserRefused when it must not run here.

    The name is looked up here (NSS) and must have the uid the front-end gave: a different
    uid is a different person, and a job never runs as anyone but its own user. The gid the
    front-end gave (the client's, from the kernel) must be one of the user's groups here too.
    """
    if not name:
        raise UserRefused("the job carries no user (a master older than this node?)")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UserRefused(f"user {name} (uid {uid}) is unknown on {node}") from None
    if pw.pw_uid != uid:
        raise UserRefused(
            f"user {name} is uid {pw.pw_uid} on {node}, not uid {uid} as on the front-end; "
            "the job does not run as anyone else"
        )
    me = os.geteuid()
    if me != 0 and uid != me:
        raise UserRefused(
            f"the daemon on {node} runs as {describe(me)}, not root, so it runs only its own "
            f"user's jobs, not {name}'s"
        )
    if uid != 0 and gid != pw.pw_gid and gid not in _groups_of(name, pw.pw_gid):
        raise UserRefused(
            f"group {gid} is not one of {name}'s groups on {node} (the front-end gave that "
            "group); the job does not run with a group its user lacks here"
        )
    # The groups matter only to a job that drops to its user; reading them is a scan of the
    # group database, on every node for every job.
    groups = _groups_of(name, gid) if me == 0 and uid != 0 else (gid,)
    return RunAs(name, uid, gid, groups, pw.pw_dir or "/", pw.pw_shell or "/bin/sh")


def _groups_of(name: str, gid: int) -> tuple[int, ...]:
    try:
        return tuple(os.getgrouplist(name, gid))
    except OSError:
        return (gid,)


def give_tree(root: str, user: RunAs) -> None:
    """Hand a job's staging tree to its user: the root mode 0700, everything in it theirs.

    The daemon writes the files as root inside a directory only root can enter; only when
    every file is in place does the tree become the user's, so no other user ever reads it
    and the user never sees a half-written file.
    """
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(top, name), user.uid, user.gid)
    os.chown(root, user.uid, user.gid)
    os.chmod(root, 0o700)


# ---------------------------------------------------------------- places root writes


class UnsafeDir(GprocError):
    """A directory a daemon writes in (binRoot and beside it, the socket's) is another
    user's to change."""


def claim_dir(path: str, switch: str) -> None:
    """Make ``path`` if needed, then check that nobody but root or this daemon's user can
    change where it leads: every directory on the way (as named and as resolved) belongs to
    one of them and is writable by nobody else (but root's group or the daemon's own) unless
    sticky (as /tmp), and ``path`` itself is a directory, not a symlink.

    A slave writes a job's files as root beside binRoot and then hands the staging tree to
    the job's user; the master makes its socket and sets its mode. A user who could rename or
    replace anything on the way (say, by creating /tmp/xproc before the daemon first ran)
    could point those writes, that hand-over or that chmod at any file of the machine.
    ``switch`` names the option that gave the path, for the message.
    """
    absolute = os.path.abspath(path)
    there = absolute
    while not os.path.lexists(there):
        there = os.path.dirname(there)
    _check_chain(path, there, switch)  # before anything is made in it
    os.makedirs(absolute, mode=0o755, exist_ok=True)
    _check_chain(path, absolute, switch)
    if not stat.S_ISDIR(os.lstat(absolute).st_mode):
        raise UnsafeDir(_unsafe(path, switch, absolute, "is a symlink, not a directory"))


def _check_chain(path: str, end: str, switch: str) -> None:
    me = os.geteuid()
    for chain in (end, os.path.realpath(end)):
        step = "/"
        for part in [""] + chain.strip("/").split("/"):
            step = os.path.join(step, part)
            st = os.lstat(step)
            if st.st_uid not in (0, me):
                raise UnsafeDir(_unsafe(path, switch, step, f"belongs to {describe(st.st_uid)}"))
            others = st.st_mode & 0o002 or (
                st.st_mode & 0o020 and st.st_gid not in (0, os.getegid())
            )  # a group of root's, or the daemon's own (a user's private group), is trusted
            if stat.S_ISDIR(st.st_mode) and others and not st.st_mode & 0o1000:
                raise UnsafeDir(
                    _unsafe(path, switch, step, "is writable by other users and not sticky")
                )


def _unsafe(path: str, switch: str, step: str, why: str) -> str:
    return (
        f"{step} {why}: another user could redirect what this daemon writes as "
        f"{describe(os.geteuid())} under {path}; remove it (as root) or give {switch} "
        "a path whose every directory only root can change (such as one under /var/lib/gproc)"
    )
