"""Assembled trees of cached files, shared read-only by private jobs as an overlay's lower layer.

Copying a job's cached files into its staging tree was most of a node's CPU per launch: on
ext4, a busy one above all, creating the ~20 inodes of ``/bin/true``'s closure (directories,
files, links) costs far more than copying their bytes (``bench/bench_launch.py``). People run
the same program again and again, so a node assembles the tree of a manifest once (copies of
the blobs, owned by the job's user) and mounts it, in the job's own mount namespace, as the
lower layer of an overlay over binRoot whose upper layer is the job's empty staging directory.
A job then costs two directories and a mount instead of a copy of its whole closure.

Nothing a job does reaches another job or the cache: writes through the overlay go to the
job's upper layer (the kernel copies a file up before changing it), and the trees live in the
cache directory, which only root may enter. A root job can still write a tree by its own path,
as it can write a blob; that moves the ctime of what it changed (ctime cannot be set back), so
every file, link and directory of a tree is stamped when it is made and checked before each
hand-out, and a tree that changed is retired, never handed out again, and rebuilt. A tree is
removed only once no job still mounts it.

Trees are per user (the files must be the user's, as a copied staging tree is), keyed by the
manifest's entries and the owner; at most ``keep`` unused ones stay, least recently used out.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from gproc import users
from gproc.bundle import Entry, Unpacker
from gproc.cache import BlobCache

log = logging.getLogger("gproc.trees")

# Characters an overlay's mount options would need escaped; such a path keeps the copy.
_UNSAFE = (",", ":", "\\", "=")

Stamp = tuple[int, int, int, int, int, int, int]  # mode, uid, gid, size, mtime, ctime, ino


def _stamp(path: str) -> Stamp:
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def usable(*paths: str) -> bool:
    """Whether these paths can go into an overlay's options as they are."""
    return not any(c in p for p in paths for c in _UNSAFE)


@dataclass(eq=False)
class SharedTree:
    """One assembled tree: where it is, its stamps, and how many jobs mount it now."""

    key: str
    path: str
    stamps: dict[str, Stamp] = field(repr=False)
    users: int = 0
    retired: bool = False  # changed behind our back (or evicted while in use): never again

    def intact(self) -> bool:
        """Every entry is as it was made (a stat each: ctime says whether anything moved)."""
        try:
            return all(_stamp(p) == s for p, s in self.stamps.items())
        except OSError:
            return False


class TreeStore:
    """The trees under ``path`` (inside the cache directory); safe to share between threads."""

    def __init__(self, path: Path, cache: BlobCache, keep: int = 8):
        self.path = str(path)
        self.cache = cache
        self.keep = keep
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._trees: OrderedDict[str, SharedTree] = OrderedDict()  # least recently used first
        shutil.rmtree(self.path, ignore_errors=True)  # a predecessor's: never stamped by us
        os.makedirs(self.path, 0o700, exist_ok=True)  # (two daemons on one binRoot: both start)

    def take(self, entries: list[Entry], owner: users.RunAs | None) -> SharedTree | None:
        """A tree of ``entries`` owned by ``owner`` (None: as the daemon), held for one job
        until :meth:`give_back`; None when a file is not cached (the job unpacks as before).

        Blocking disk work: call it from a worker thread.
        """
        if not all(e.kind != "f" or self.cache.holds(e.sha256) for e in entries):
            return None
        key = _key(entries, owner)
        with self._lock:
            tree = self._trees.get(key)
        if tree is not None:
            if tree.intact():
                with self._lock:
                    if not tree.retired:
                        tree.users += 1
                        self._trees.move_to_end(key)
                        return tree
            else:
                log.warning("shared tree %s changed since it was made; retiring it", tree.path)
                self._retire(tree)
        return self._build(key, entries, owner)

    def give_back(self, tree: SharedTree) -> None:
        """The job that held ``tree`` is over (its namespace, and so its mount, is gone)."""
        with self._lock:
            tree.users -= 1
            doomed = self._doomed() + ([tree] if tree.retired and tree.users == 0 else [])
        _remove(doomed)

    def _build(
        self, key: str, entries: list[Entry], owner: users.RunAs | None
    ) -> SharedTree | None:
        """Assemble the tree under a temporary name, stamp it, and put it in its place.

        When another job built the same tree meanwhile, that one is used and this one goes.
        """
        tmp = os.path.join(self.path, f".new-{os.getpid()}-{next(self._names)}")
        unpacker = Unpacker(Path(tmp), entries, "tree", self.cache, root_mode=0o755)
        if not unpacker.complete:  # a blob evicted or changed meanwhile
            unpacker.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        if owner is not None:
            users.give_tree(tmp, owner)
        final = os.path.join(self.path, key)
        with self._lock:
            tree = self._trees.get(key)
            if tree is None:
                os.rename(tmp, final)  # a directory's rename moves its ctime: stamp after it
                tree = SharedTree(key, final, _stamps(final, entries))
                self._trees[key] = tree
                tmp = ""
            tree.users += 1
            doomed = self._doomed()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove(doomed)
        return tree

    def _retire(self, tree: SharedTree) -> None:
        """Never hand ``tree`` out again; remove it once no job mounts it."""
        with self._lock:
            if self._trees.get(tree.key) is tree:
                del self._trees[tree.key]
                retired = os.path.join(self.path, f".old-{next(self._names)}")
                os.rename(tree.path, retired)
                tree.path = retired
            tree.retired = True
            doomed = self._doomed() + ([tree] if tree.users == 0 else [])
        _remove(doomed)

    def _doomed(self) -> list[SharedTree]:
        """Unused trees beyond ``keep``, oldest first, taken out of the index (lock held)."""
        idle = [t for t in self._trees.values() if t.users == 0]
        out = idle[: max(0, len(self._trees) - self.keep)]
        for tree in out:
            del self._trees[tree.key]
        return out


def _key(entries: list[Entry], owner: users.RunAs | None) -> str:
    who = (owner.uid, owner.gid) if owner is not None else (os.geteuid(), os.getegid())
    body = [[e.path, e.kind, e.mode, e.size, e.sha256, e.link] for e in entries]
    return hashlib.sha256(msgpack.packb([who, body])).hexdigest()


def _stamps(root: str, entries: list[Entry]) -> dict[str, Stamp]:
    """The stamp of the root and of every entry (and of the directories the entries sit in)."""
    paths = {root}
    for e in entries:
        path = os.path.normpath(os.path.join(root, e.path))
        while path.startswith(root + "/"):
            paths.add(path)
            path = os.path.dirname(path)
    return {p: _stamp(p) for p in sorted(paths)}


def _remove(trees: list[SharedTree]) -> None:
    for tree in trees:
        if tree.users == 0:
            with contextlib.suppress(OSError):
                shutil.rmtree(tree.path)
