"""The gproc artifact: one zipapp that needs only python3 on a node.

Built from the code this process imports (a working tree or an installed copy), so the
container harness and the SSH deployer ship exactly what is being tested. The hash names
the artifact: a node that already holds the same hash needs no upload.

The pure-Python parts of msgpack, pyelftools and ClusterShell travel inside it, under
``_vendor``, which goes at the END of ``sys.path``: a node that has msgpack installed (with
its C extension) uses that; a bare node falls back to the copy in the archive.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import io
import py_compile
import sys
import tempfile
import zipfile
from importlib.abc import Traversable
from pathlib import Path
from types import ModuleType

import gproc
import gproc.deploy
import gproc.locales

MAIN = """\
import os
import sys

sys.path.append(os.path.join(os.path.dirname(__file__), "_vendor"))
from gproc.cli import main  # noqa: E402

sys.exit(main())
"""
VENDORED = ("msgpack", "elftools", "ClusterShell")


def _stage(into: Path) -> None:
    """Lay the three mapped packages out as one ``gproc`` package tree, vendored next to it."""
    _copy(importlib.resources.files(gproc), into / "gproc")
    for sub, module in (("locales", gproc.locales), ("deploy", gproc.deploy)):
        _copy(importlib.resources.files(module), into / "gproc" / sub)
    for name in VENDORED:
        _copy(importlib.resources.files(_vendored(name)), into / "_vendor" / name)


def _vendored(name: str) -> ModuleType:
    """A vendored package: installed, or else the copy an unpacked artifact carries beside
    gproc (a deployer run from an artifact, as the harness's front-end does)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        beside = Path(gproc.__file__).resolve().parent.parent / "_vendor"
        if not (beside / name).is_dir():
            raise
        sys.path.append(str(beside))
        return importlib.import_module(name)


def _copy(src: Traversable, dest: Path) -> None:
    """Copy a package's files, whether it lives in a directory or inside a zipapp."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "__pycache__" or item.name.endswith(".pyc"):
            continue
        if item.is_dir():
            _copy(item, dest / item.name)
        else:
            (dest / item.name).write_bytes(item.read_bytes())


def build_zipapp(dest: Path) -> tuple[Path, str]:
    """Write ``dest`` (a .pyz) and return it with its sha256; identical code, identical bytes."""
    with tempfile.TemporaryDirectory(prefix="gproc-artifact-") as tmp:
        staged = Path(tmp)
        _stage(staged)
        buf = io.BytesIO()
        buf.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            _add(zf, "__main__.py", MAIN.encode())
            for path in sorted(staged.rglob("*.py")):
                name = path.relative_to(staged).as_posix()
                _add(zf, name, path.read_bytes())
                _add(zf, name[:-3] + ".pyc", _compiled(path, name))
    data = buf.getvalue()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    tmp_dest.chmod(0o755)
    tmp_dest.replace(dest)
    return dest, hashlib.sha256(data).hexdigest()


def _compiled(path: Path, name: str) -> bytes:
    """The module's bytecode for this Python, beside its source in the archive.

    Python imports from a zip without writing bytecode anywhere, so without these every start
    of gproc compiled all of it again: 40 ms of a client's 100 ms of CPU on the harness's
    front-end. An unchecked hash-based pyc (PEP 552) is used as it is, with no timestamp in
    it; a node with another Python version finds a different magic number and compiles the
    source, as before.
    """
    out = path.with_suffix(".pyc")
    py_compile.compile(
        str(path),
        str(out),
        dfile=name,
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return out.read_bytes()


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Fixed timestamps and modes: the archive's bytes depend on the code alone."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)
