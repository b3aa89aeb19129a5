"""The ELF closure of a program: its loader and every shared library it needs (docs/ELF.md).

Libraries are found the way glibc's ld.so finds them, by reading PT_INTERP and the dynamic
section with pyelftools.  We never run ldd: it executes the program's loader on the host, is
slow, and cannot look inside another root (`-r`).  Everything is root-relative so that a root
other than "/" (a chroot or container image) never leaks host files into the closure.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import posixpath
import re
import stat
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from gproc.errors import GprocError

if TYPE_CHECKING:  # pyelftools is imported where headers are read: a cached closure
    from elftools.construct.lib.container import Container  # (gproc.closures) needs none
    from elftools.elf.structs import ELFStructs


class ClosureError(GprocError):
    """The closure cannot be built; the message names the object and what to do about it."""


@dataclass
class Closure:
    """What to ship for one program; every path is root-relative and absolute."""

    program: str
    interp: str | None
    objects: list[str]
    libdirs: list[str]


# e_ident/e_machine of an object: (EI_CLASS, EI_DATA, e_machine).  Two objects are
# compatible (ld.so would load one into the other) only when these are equal.
_Kind = tuple[int, int, int]
_ELFCLASS64 = 2
_PN_XNUM = 0xFFFF
_MAX_SYMLINKS = 40  # as Linux: beyond this a path is treated as unresolvable (ELOOP)

# Debian multiarch triplet and AT_PLATFORM ($PLATFORM) per kind; None when unknown, which
# makes ld.so drop any path element using $PLATFORM.
_MACHINES: dict[_Kind, tuple[str, str | None]] = {
    (2, 1, 62): ("x86_64-linux-gnu", "x86_64"),
    (1, 1, 3): ("i386-linux-gnu", "i686"),
    (2, 1, 183): ("aarch64-linux-gnu", "aarch64"),
    (1, 1, 40): ("arm-linux-gnueabihf", "v7l"),
    (2, 1, 21): ("powerpc64le-linux-gnu", None),
    (2, 2, 22): ("s390x-linux-gnu", None),
    (2, 1, 243): ("riscv64-linux-gnu", None),
}

# Dynamic string tokens, braced or bare (a bare one must end at a non-identifier character).
_DST = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")
_NSS_ACTION = re.compile(r"\[[^\]]*\]")
# Libraries glibc dlopens by itself, invisible in DT_NEEDED (libnss_* come from nsswitch.conf).
_GLIBC_DLOPENS = ("libgcc_s.so.1",)
_NSS_DEFAULT_SERVICES = ("files", "dns")  # what glibc uses when nsswitch.conf is absent


# --- paths inside a root ---------------------------------------------------------------


# --- what a closure was read from ----------------------------------------------------------

Stamp = tuple[int, int, int, int, int, int]  # dev, ino, mode, size, mtime_ns, ctime_ns
_seen: dict[str, Stamp | None] | None = None  # set while recording()


def stamp(host_path: str) -> Stamp | None:
    """What lstat says of a path, None when it is absent: any change to the file (its bytes,
    its name's target, the entries of a directory) moves its ctime, which cannot be set back."""
    try:
        st = os.lstat(host_path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _look(host_path: str) -> None:
    """Note a path the answer depends on, as it is before it is read."""
    if _seen is not None and host_path not in _seen:
        _seen[host_path] = stamp(host_path)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, Stamp | None]]:
    """Every path looked at meanwhile (lstat, open, list, probe), with its stamp: while they
    all stamp the same, so does the answer (gproc.closures keeps it on that condition)."""
    global _seen
    _seen = seen = {}
    try:
        yield seen
    finally:
        _seen = None


def _host(root: str, path: str) -> str:
    """Host path of root-relative absolute `path` (root already normalised)."""
    return path if root == "/" else root + path


def _under(root: str) -> str:
    """Where, for messages: nothing for the host's own root."""
    return "" if root == "/" else f" under root {root}"


def _normroot(root: str) -> str:
    """Absolute root without a trailing slash, or "/"."""
    return os.path.abspath(root)


def _resolve(root: str, path: str) -> str:
    """Root-relative absolute path of the object `path` names, symlinks followed as in a chroot.

    Absolute link targets restart at the root and ".." stops at it, so nothing outside `root`
    is ever reached.  Raises FileNotFoundError when a component is missing, is not a directory
    where one is needed, or the links loop.
    """
    parts = deque(path.split("/"))
    resolved = ""
    links = 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.rpartition("/")[0]
            continue
        candidate = f"{resolved}/{part}"
        _look(_host(root, candidate))
        try:
            mode = os.lstat(_host(root, candidate)).st_mode
        except OSError:
            raise FileNotFoundError(errno.ENOENT, "not found in root " + root, path) from None
        if stat.S_ISLNK(mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise FileNotFoundError(errno.ELOOP, "too many symlinks in root " + root, path)
            target = os.readlink(_host(root, candidate))
            if target.startswith("/"):
                resolved = ""
            parts.extendleft(reversed(target.split("/")))
            continue
        if parts and not stat.S_ISDIR(mode):
            raise FileNotFoundError(errno.ENOTDIR, "not a directory in root " + root, path)
        resolved = candidate
    return resolved or "/"


def resolve_in_root(root: str, path: str) -> str:
    """Host path of root-relative absolute `path`, following symlinks as a chroot would.

    Absolute link targets are taken relative to `root` and ".." cannot climb above it; the
    result is the fully resolved host path.  Raises FileNotFoundError when missing.
    """
    root = _normroot(root)
    return _host(root, _resolve(root, path))


def _absolute(path: str, root: str) -> str:
    """Make a user-given path root-relative absolute: relative paths mean the current
    directory only when the root is the host's own."""
    if path.startswith("/"):
        return posixpath.normpath(path)
    if root == "/":
        return os.path.abspath(path)
    return posixpath.normpath("/" + path)


# --- ELF headers -----------------------------------------------------------------------


def _kind(host_path: str) -> _Kind | None:
    """(class, data, machine) from the first 20 bytes, or None for anything not ELF.

    Reading the raw header is much cheaper than building an ELFFile, and the library search
    checks many candidates."""
    _look(host_path)
    try:
        with open(host_path, "rb") as f:
            return _parse_kind(f.read(20))
    except OSError:
        return None


def _parse_kind(head: bytes) -> _Kind | None:
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    return head[4], head[5], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def is_elf(host_path: str) -> bool:
    """True when `host_path` is a readable ELF file (scripts are shipped without a closure)."""
    return _kind(host_path) is not None


@dataclass
class _Dynamic:
    """The parts of an object that decide what ld.so loads next."""

    interp: str | None = None
    soname: str | None = None
    needed: list[str] = field(default_factory=list)
    rpath: str | None = None
    runpath: str | None = None


def _read_dynamic(host_path: str, shown: str) -> _Dynamic:
    """PT_INTERP and the dynamic tags, read from the program headers only.

    Uses pyelftools' struct layouts rather than ELFFile: importing ELFFile costs as much again
    as the layouts, and its DynamicSegment scans every section header to find the string
    table, milliseconds per library paid at every launch.  The dynamic table's own DT_STRTAB,
    mapped through the PT_LOAD headers, is all ld.so itself uses.
    """
    from elftools.common.exceptions import ELFError
    from elftools.common.utils import struct_parse
    from elftools.construct import ConstructError

    _look(host_path)
    try:
        with open(host_path, "rb") as f:
            kind = _parse_kind(f.read(20))
            if kind is None:
                raise ValueError("not an ELF file")
            structs, ehdr = _structs(f, kind)
            headers = [
                struct_parse(structs.Elf_Phdr, f, ehdr["e_phoff"] + n * ehdr["e_phentsize"])
                for n in range(_phnum(structs, f, ehdr))
            ]
            dyn = _Dynamic()
            for header in headers:
                if header["p_type"] == "PT_INTERP":
                    dyn.interp = _string(f, header["p_offset"])
                elif header["p_type"] == "PT_DYNAMIC":
                    _read_tags(structs, f, header, headers, dyn)
            return dyn
    except (ELFError, OSError, ValueError, ConstructError) as e:
        raise ClosureError(f"{shown}: cannot read its ELF headers ({e})") from e


def _structs(f: BinaryIO, kind: _Kind) -> tuple[ELFStructs, Container]:
    """Struct layouts for the file and its parsed ELF header."""
    from elftools.common.utils import struct_parse

    ehdr = struct_parse(_basic_structs(kind).Elf_Ehdr, f, 0)
    key = (ehdr["e_type"], ehdr["e_machine"], ehdr["e_ident"]["EI_OSABI"])
    return _advanced_structs(kind, *key), ehdr


@functools.cache
def _basic_structs(kind: _Kind) -> ELFStructs:
    """Cached, like _advanced_structs: building layouts costs more than parsing with them."""
    from elftools.elf.structs import ELFStructs

    structs = ELFStructs(little_endian=kind[1] == 1, elfclass=64 if kind[0] == _ELFCLASS64 else 32)
    structs.create_basic_structs()
    return structs


@functools.cache
def _advanced_structs(kind: _Kind, e_type: str, e_machine: str, osabi: str) -> ELFStructs:
    from elftools.elf.structs import ELFStructs

    structs = ELFStructs(little_endian=kind[1] == 1, elfclass=64 if kind[0] == _ELFCLASS64 else 32)
    structs.create_basic_structs()
    structs.create_advanced_structs(e_type, e_machine, osabi)
    return structs


def _phnum(structs: ELFStructs, f: BinaryIO, ehdr: Container) -> int:
    """Number of program headers; PN_XNUM means it is in section 0's sh_info."""
    from elftools.common.utils import struct_parse

    if ehdr["e_phnum"] != _PN_XNUM:
        return ehdr["e_phnum"]
    return struct_parse(structs.Elf_Shdr, f, ehdr["e_shoff"])["sh_info"]


def _read_tags(
    structs: ELFStructs, f: BinaryIO, dynamic: Container, headers: list[Container], dyn: _Dynamic
) -> None:
    """Fill `dyn` from the PT_DYNAMIC segment `dynamic`."""
    from elftools.common.utils import struct_parse

    size = structs.Elf_Dyn.sizeof()
    tags: list[tuple[str, int]] = []
    for n in range(dynamic["p_filesz"] // size):
        entry = struct_parse(structs.Elf_Dyn, f, dynamic["p_offset"] + n * size)
        if entry["d_tag"] == "DT_NULL":
            break
        tags.append((entry["d_tag"], entry["d_val"]))
    strtab = next((_file_offset(v, headers) for t, v in tags if t == "DT_STRTAB"), None)
    for tag, value in tags:
        if tag not in _STRING_TAGS:
            continue
        if strtab is None:
            raise ValueError(f"{tag} without a mapped DT_STRTAB")
        text = _string(f, strtab + value)
        if tag == "DT_NEEDED":
            dyn.needed.append(text)
        else:
            setattr(dyn, _STRING_TAGS[tag], text)


def _file_offset(address: int, headers: list[Container]) -> int | None:
    """File offset of a virtual address, through the PT_LOAD segment holding it."""
    for h in headers:
        if h["p_type"] == "PT_LOAD" and h["p_vaddr"] <= address < h["p_vaddr"] + h["p_filesz"]:
            return address - h["p_vaddr"] + h["p_offset"]
    return None


def _string(f: BinaryIO, offset: int) -> str:
    """NUL-terminated string; undecodable bytes survive as surrogates, like os paths."""
    from elftools.common.utils import parse_cstring_from_stream

    return (parse_cstring_from_stream(f, offset) or b"").decode("utf-8", "surrogateescape")


# Dynamic tags whose value is a string, and the _Dynamic field each fills.
_STRING_TAGS = {
    "DT_NEEDED": "needed",
    "DT_SONAME": "soname",
    "DT_RPATH": "rpath",
    "DT_RUNPATH": "runpath",
}


# --- configuration inside the root ------------------------------------------------------


def _read_text(root: str, path: str) -> str | None:
    """Contents of a root-relative text file, None when absent or unreadable."""
    try:
        host = resolve_in_root(root, path)
        _look(host)
        with open(host, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _listdir(root: str, path: str) -> list[str]:
    try:
        host = resolve_in_root(root, path)
        _look(host)
        return os.listdir(host)
    except OSError:
        return []


def _glob(root: str, pattern: str) -> list[str]:
    """Root-relative matches of an absolute glob, sorted like glob(3); every directory is
    listed through the root so absolute symlinks (e.g. /etc/ld.so.conf.d) stay inside it."""
    paths = ["/"]
    for part in filter(None, pattern.split("/")):
        if not any(c in part for c in "*?["):
            paths = [posixpath.join(p, part) for p in paths]
            continue
        hidden_ok = part.startswith(".")
        paths = [
            posixpath.join(p, name)
            for p in paths
            for name in sorted(_listdir(root, p))
            if fnmatch.fnmatchcase(name, part) and (hidden_ok or not name.startswith("."))
        ]
    return paths


def _ld_so_conf(
    root: str, path: str = "/etc/ld.so.conf", seen: set[str] | None = None
) -> list[str]:
    """Directories listed by ROOT/etc/ld.so.conf, following `include` lines like ldconfig.

    ld.so really reads /etc/ld.so.cache, but ldconfig builds that from these files, and the
    cache of another root may be stale or absent.  Relative includes are relative to the
    including file's directory; include loops are cut (files are told apart once resolved).
    """
    seen = set() if seen is None else seen
    try:
        real = _resolve(root, path)
    except FileNotFoundError:
        return []
    if real in seen or (text := _read_text(root, real)) is None:
        return []
    seen.add(real)
    dirs: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] == "hwcap":
            continue
        if words[0] == "include":
            for pattern in words[1:]:
                pattern = posixpath.join(posixpath.dirname(path), pattern)
                for conf in _glob(root, pattern):
                    dirs += _ld_so_conf(root, conf, seen)
        elif words[0].startswith("/"):
            dirs.append(posixpath.normpath(words[0]))
    return dirs


def _nss_services(root: str) -> list[str]:
    """Service names of ROOT/etc/nsswitch.conf (whose libnss_<service>.so.2 glibc dlopens)."""
    text = _read_text(root, "/etc/nsswitch.conf")
    if text is None:
        return list(_NSS_DEFAULT_SERVICES)
    services: dict[str, None] = {}
    for line in text.splitlines():
        line = _NSS_ACTION.sub(" ", line.split("#", 1)[0])
        _, colon, sources = line.partition(":")
        if colon:
            services.update(dict.fromkeys(sources.split()))
    return list(services)


# --- the search -------------------------------------------------------------------------


@dataclass
class _Obj:
    """One loaded object: where it was found, what it needs, the directories it adds."""

    path: str  # root-relative, as found
    real: str  # root-relative, fully resolved (identity, like ld.so's st_dev/st_ino check)
    dyn: _Dynamic
    rpath: list[str]  # expanded; empty when the object has a RUNPATH (ld.so ignores RPATH then)
    runpath: list[str] | None  # expanded; None when absent (which enables the RPATH chain)
    loader: _Obj | None
    optional: bool  # loaded for glibc's own dlopen: missing dependencies are not fatal


class _Search:
    """State of one closure() call: root, the program's kind and the caches of directories."""

    def __init__(self, root: str, kind: _Kind, extra_dirs: Sequence[str]):
        self.root = root
        self.kind = kind
        self.extra = [_absolute(d, root) for d in extra_dirs]
        triplet, self.platform = _MACHINES.get(kind, (None, None))
        self.lib = "lib64" if kind[0] == _ELFCLASS64 else "lib"
        self.defaults = self._defaults(triplet)
        self._conf: list[str] | None = None
        self._dirs: dict[str, str | None] = {}
        self._kinds: dict[str, _Kind | None] = {}

    def _defaults(self, triplet: str | None) -> list[str]:
        """ld.so's trusted directories: multiarch, then lib64 for 64-bit, then lib."""
        dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
        if self.kind[0] == _ELFCLASS64:
            dirs += ["/lib64", "/usr/lib64"]
        return dirs + ["/lib", "/usr/lib"]

    def conf(self) -> list[str]:
        if self._conf is None:
            self._conf = _ld_so_conf(self.root)
        return self._conf

    def expand(self, text: str, origin: str) -> str | None:
        """`text` with $ORIGIN/$LIB/$PLATFORM replaced; None when a value is unknown (ld.so
        then drops the element)."""
        values = {"ORIGIN": origin, "LIB": self.lib, "PLATFORM": self.platform}
        if any(values[m[1] or m[2]] is None for m in _DST.finditer(text)):
            return None
        return _DST.sub(lambda m: values[m[1] or m[2]], text)

    def path_list(self, text: str | None, origin: str) -> list[str]:
        """An RPATH/RUNPATH string as root-relative directories (empty elements dropped)."""
        dirs = (self.expand(d, origin) for d in (text or "").split(":") if d)
        return [_absolute(d, self.root) for d in dirs if d]

    def dirs_for(self, requester: _Obj) -> list[str]:
        """Search order of glibc's _dl_map_object for a name `requester` needs."""
        dirs: list[str] = []
        if requester.runpath is None:
            obj: _Obj | None = requester
            while obj is not None:
                dirs += obj.rpath
                obj = obj.loader
        dirs += self.extra
        dirs += requester.runpath or []
        return list(dict.fromkeys(dirs + self.conf() + self.defaults))

    def _dir(self, path: str) -> str | None:
        """Resolved root-relative directory, cached: most candidates are misses and need only
        one lstat in an already resolved directory."""
        if path not in self._dirs:
            try:
                self._dirs[path] = _resolve(self.root, path)
            except FileNotFoundError:
                self._dirs[path] = None
        return self._dirs[path]

    def accepts(self, path: str) -> str | None:
        """Resolved path of `path` when it is an ELF object of the program's kind."""
        try:
            real = _resolve(self.root, path)
        except FileNotFoundError:
            return None
        if real not in self._kinds:
            self._kinds[real] = _kind(_host(self.root, real))
        return real if self._kinds[real] == self.kind else None

    def find(self, name: str, dirs: list[str]) -> tuple[str, str] | None:
        """(path as found, resolved path) of the first acceptable `name` in `dirs`."""
        for d in dirs:
            resolved = self._dir(d)
            if resolved is None:
                continue
            probe = _host(self.root, f"{resolved}/{name}")
            _look(probe)
            if not os.path.lexists(probe):
                continue
            found = f"{_clean_dir(d, resolved)}/{name}"
            real = self.accepts(found)
            if real is not None:
                return found, real
        return None


def _clean_dir(path: str, resolved: str) -> str:
    """The directory as written, unless "." or ".." in it (from $ORIGIN/../lib) would make
    a path the shipped tree cannot reproduce lexically: then its resolved form."""
    parts = path.split("/")
    return resolved if "." in parts or ".." in parts else path.rstrip("/") or "/"


# --- the closure ------------------------------------------------------------------------


class _Builder:
    """Breadth-first walk of DT_NEEDED, one object per soname and per file."""

    def __init__(self, search: _Search, skip_missing: bool):
        self.search = search
        self.skip_missing = skip_missing
        self.by_name: dict[str, _Obj] = {}
        self.by_real: dict[str, _Obj] = {}
        self.objects: dict[str, None] = {}
        self.libdirs: dict[str, None] = {}
        self.queue: deque[_Obj] = deque()

    def load(
        self, path: str, real: str, loader: _Obj | None, optional: bool = False, origin: str = ""
    ) -> _Obj:
        """Read an object, record it under its path and soname, and queue its needs.

        $ORIGIN is the directory `path` was found in unless `origin` says otherwise."""
        dyn = _read_dynamic(_host(self.search.root, real), path)
        rpath, runpath = self._dirs(dyn, origin or posixpath.dirname(path))
        obj = _Obj(path, real, dyn, rpath, runpath, loader, optional)
        self.by_real[real] = obj
        self.by_name[path] = obj
        if dyn.soname:
            self.by_name.setdefault(dyn.soname, obj)
        self.objects[path] = None
        self.queue.append(obj)
        return obj

    def _dirs(self, dyn: _Dynamic, origin: str) -> tuple[list[str], list[str] | None]:
        """(rpath, runpath) of an object; RPATH is ignored when there is a RUNPATH."""
        if dyn.runpath is not None:
            return [], self.search.path_list(dyn.runpath, origin)
        return self.search.path_list(dyn.rpath, origin), None

    def walk(self) -> None:
        while self.queue:
            obj = self.queue.popleft()
            for name in obj.dyn.needed:
                if name not in self.by_name:
                    self.need(name, obj)

    def need(self, name: str, requester: _Obj, optional: bool = False) -> None:
        """Find `name` for `requester` and load it unless the same file is already loaded."""
        expanded = self.search.expand(name, posixpath.dirname(requester.path)) or name
        found = self._locate(expanded, requester)
        if found is None:
            if not (self.skip_missing or optional or requester.optional):
                raise ClosureError(self._missing(expanded, requester))
            return
        path, real = found
        self.libdirs[posixpath.dirname(path)] = None
        obj = self.by_real.get(real)
        if obj is None:
            obj = self.load(path, real, requester, optional or requester.optional)
        self.objects[path] = None  # another name of a loaded file must exist on the node too
        self.by_name[name] = obj

    def _locate(self, name: str, requester: _Obj) -> tuple[str, str] | None:
        if "/" not in name:
            return self.search.find(name, self.search.dirs_for(requester))
        path = _absolute(name, self.search.root)
        real = self.search.accepts(path)
        return None if real is None else (path, real)

    def _missing(self, name: str, requester: _Obj) -> str:
        dirs = ":".join(self.search.dirs_for(requester)) if "/" not in name else name
        return (
            f"{name} (needed by {requester.path}) not found{_under(self.search.root)} in {dirs}; "
            "add its directory with -L or ship it with -f"
        )


def find_program(name: str, root: str = "/", path_env: str | None = None) -> str:
    """Root-relative absolute path of the program `name`, searched in PATH when it has no "/".

    Relative paths with a "/" are taken against the current directory only for the host's own
    root; PATH (path_env, default $PATH) is searched inside `root`.
    """
    root = _normroot(root)
    if "/" in name:
        candidates = [_absolute(name, root)]
    else:
        path_env = os.environ.get("PATH", "") if path_env is None else path_env
        candidates = [posixpath.join(_absolute(d or ".", root), name) for d in path_env.split(":")]
    for path in candidates:
        if _is_executable(root, path):
            return path
    searched = candidates[0] if "/" in name else "PATH"
    raise ClosureError(f"{name}: no executable file found{_under(root)} (looked in {searched})")


def _is_executable(root: str, path: str) -> bool:
    try:
        host = resolve_in_root(root, path)
    except FileNotFoundError:
        return False
    return os.path.isfile(host) and os.access(host, os.X_OK)


def closure(
    program: str, root: str = "/", extra_dirs: Sequence[str] = (), skip_missing: bool = False
) -> Closure:
    """Closure of root-relative absolute `program` (from find_program) inside `root`.

    `extra_dirs` (-L) are searched where LD_LIBRARY_PATH would be.  A library that cannot be
    found raises ClosureError unless `skip_missing`; the loader itself is always required.
    """
    root = _normroot(root)
    try:
        real = _resolve(root, program)
    except FileNotFoundError:
        raise ClosureError(f"{program}: not found" + _under(root)) from None
    kind = _kind(_host(root, real))
    if kind is None:
        raise ClosureError(f"{program}: not an ELF executable" + _under(root))
    builder = _Builder(_Search(root, kind, extra_dirs), skip_missing)
    # glibc's $ORIGIN for the executable comes from /proc/self/exe, i.e. its resolved path.
    main = builder.load(program, real, None, origin=posixpath.dirname(real))
    interp = main.dyn.interp
    if interp is not None:
        _load_interp(builder, interp, program)
    builder.walk()
    _add_glibc_dlopens(builder)
    return Closure(program, interp, list(builder.objects), list(builder.libdirs))


def _load_interp(builder: _Builder, interp: str, program: str) -> None:
    """Load PT_INTERP; its soname then satisfies libc's DT_NEEDED on it, as in ld.so."""
    real = builder.search.accepts(interp)
    if real is None:
        raise ClosureError(
            f"{interp} (the loader of {program}) not found or not a matching ELF object"
            + _under(builder.search.root)
            + "; its path is fixed in the program, so it must exist at exactly that path"
        )
    builder.load(interp, real, None)


def _add_glibc_dlopens(builder: _Builder) -> None:
    """Add the libraries glibc dlopens itself, when present; only for glibc programs."""
    libc = builder.by_name.get("libc.so.6")
    if libc is None:
        return
    names = [f"libnss_{s}.so.2" for s in _nss_services(builder.search.root)]
    for name in [*names, *_GLIBC_DLOPENS]:
        if name not in builder.by_name:
            builder.need(name, libc, optional=True)
    builder.walk()


def loader_takes_argv0(root: str, interp: str | None) -> bool:
    """glibc's loader learned --argv0 in 2.33; look for the option in the shipped loader."""
    if not interp:
        return False
    host = resolve_in_root(root, interp)
    _look(host)
    with open(host, "rb") as f:
        return b"--argv0" in f.read()
