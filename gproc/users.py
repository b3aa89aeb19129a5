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
    uid is a different person, and a job never runs as anyone but its own user.
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
    try:
        groups = tuple(os.getgrouplist(name, gid))
    except OSError:
        groups = (gid,)
    return RunAs(name, uid, gid, groups, pw.pw_dir or "/", pw.pw_shell or "/bin/sh")


def drop_to(user: RunAs) -> None:
    """In the forked child, after the private mount is made as root: become the user.

    Groups first, then gid, then uid: each step needs the privilege the next one drops.
    (gproc.sandbox then sets no-new-privileges.)
    """
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)


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
