"""The harness images: a base, a wheelhouse, and the node and front-end images built on them.

Nothing here may depend on a registry: where ``debian:bookworm-slim`` can be found or pulled
it is the base, and where it cannot, the base is a ``debootstrap --variant=minbase`` root
imported with ``docker import`` (debootstrap is installed first if missing and the host
allows it: ``harness/host.py``). Python packages come from a wheelhouse downloaded on the
host, because containers cannot reach the package index. Every image is tagged by a hash of
its inputs, so a second run reuses it and a changed input builds a new one. The gproc code is
not an input: it reaches the containers as a zipapp mounted at run time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from .host import ensure_tool, say

HERE = Path(__file__).resolve().parent
SLIM = "debian:bookworm-slim"
SUITE = "bookworm"
MIRROR = os.environ.get("GPROC_HARNESS_MIRROR", "http://deb.debian.org/debian")
ATTEMPTS = 4  # debootstrap tries, for a mirror or name server failing for a moment
BASE_INCLUDE = ("python3",)
PYTHON = "3.11"  # bookworm's python3; the wheels must match its ABI
GLIBC = 36  # bookworm's glibc is 2.36: wheels up to manylinux_2_36 run there
WHEELS = {
    "node": ("msgpack>=1.0",),
    "frontend": ("msgpack>=1.0", "pyelftools>=0.29", "fabric>=3"),
}
NODE_REPO, FRONTEND_REPO, BASE_REPO = (
    "gproc-harness-node",
    "gproc-harness-frontend",
    "gproc-harness-base",
)


class ImageError(RuntimeError):
    """An image cannot be made; the message names the step and what to install or fix."""


@dataclass(frozen=True)
class Images:
    """The two images a cluster runs."""

    node: str
    frontend: str


def cache_dir() -> Path:
    """Where wheelhouses are kept between runs (``GPROC_HARNESS_CACHE`` overrides)."""
    default = Path.home() / ".cache" / "gproc-harness"
    path = Path(os.environ.get("GPROC_HARNESS_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(*parts: bytes | str) -> str:
    """A short, stable hash of the inputs, used as an image tag."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _has_image(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def _try_pull(client: docker.DockerClient, ref: str) -> bool:
    """Pull ``ref`` if a registry answers; no registry is a normal case, not an error."""
    repo, _, tag = ref.partition(":")
    try:
        client.images.pull(repo, tag=tag or "latest")
    except docker.errors.APIError as error:
        say(f"cannot pull {ref} ({error.explanation or error}); building the base here")
        return False
    return True


def base_image(client: docker.DockerClient) -> str:
    """The base to build on: ``GPROC_HARNESS_BASE``, the slim image, or our own import."""
    forced = os.environ.get("GPROC_HARNESS_BASE")
    if forced:
        if not (_has_image(client, forced) or _try_pull(client, forced)):
            raise ImageError(f"GPROC_HARNESS_BASE={forced} is neither present nor pullable")
        return forced
    tag = f"{BASE_REPO}:{digest(SUITE, MIRROR, 'minbase', *BASE_INCLUDE)}"
    for ref in (SLIM, tag):
        if _has_image(client, ref):
            return ref
    if _try_pull(client, SLIM):
        return SLIM
    _debootstrap_import(tag)
    return tag


def _debootstrap_import(tag: str) -> None:
    """debootstrap a minimal bookworm with python3 and import it as ``tag``."""
    why = f"to build the base image ({SLIM} cannot be pulled)"
    debootstrap = ensure_tool("debootstrap", "debootstrap", why)
    with tempfile.TemporaryDirectory(prefix="gproc-harness-root-") as tmp:
        root = Path(tmp) / "root"
        say(f"debootstrap {SUITE} from {MIRROR} (about a minute)")
        cmd = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_INCLUDE)}"]
        for attempt in range(1, ATTEMPTS + 1):  # a mirror failing for a moment: again
            try:
                _run([*cmd, SUITE, str(root), MIRROR], "debootstrap")
                break
            except ImageError:
                if attempt == ATTEMPTS:
                    raise
                say(f"debootstrap failed (attempt {attempt} of {ATTEMPTS}); trying again")
                shutil.rmtree(root, ignore_errors=True)
                time.sleep(5 * attempt)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        say(f"docker import {tag}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = ["docker", "import", "-c", 'CMD ["/bin/bash"]', "-", tag]
        _run(imp, "docker import", stdin=tar.stdout)
        if tar.wait() != 0:
            raise ImageError("tar of the debootstrap root failed")


def _run(cmd: list[str], what: str, stdin: object = None) -> None:
    """Run a host command, keeping its last lines for the error message."""
    proc = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True)  # type: ignore[arg-type]
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def wheelhouse(role: str) -> Path:
    """The wheels of one image, downloaded once for bookworm's cp311 and kept in the cache."""
    reqs = WHEELS[role]
    machine = platform.machine()
    where = cache_dir() / f"wheels-{role}-{digest(PYTHON, str(GLIBC), machine, *reqs)}"
    if (where / ".complete").exists():
        return where
    shutil.rmtree(where, ignore_errors=True)
    say(f"pip download {' '.join(reqs)} (cp{PYTHON.replace('.', '')}, {machine})")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON, "--implementation", "cp"]
    for tag in ("manylinux1", "manylinux2010", "manylinux2014"):
        cmd += ["--platform", f"{tag}_{machine}"]
    for minor in range(5, GLIBC + 1):  # pip 23 does not expand manylinux_2_N to older tags
        cmd += ["--platform", f"manylinux_2_{minor}_{machine}"]
    cmd += ["--dest", str(where), *reqs]
    _run(cmd, "pip download of the wheelhouse")
    (where / ".complete").touch()
    return where


def _context(into: Path) -> str:
    """Assemble the build context; returns the hash of everything in it."""
    shutil.copy(HERE / "Dockerfile", into / "Dockerfile")
    shutil.copy(HERE / "image" / "install_wheels.py", into / "install_wheels.py")
    shutil.copytree(HERE / "image" / "bin", into / "bin")
    for role in WHEELS:
        shutil.copytree(wheelhouse(role), into / "wheels" / role, ignore=_dotfiles)
    files = sorted(p for p in into.rglob("*") if p.is_file())
    return digest(
        *(f"{p.relative_to(into)}:{p.stat().st_mode:o}" for p in files),
        *(p.read_bytes() for p in files),
    )


def _dotfiles(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(".")]


def build_images(client: docker.DockerClient | None = None) -> Images:
    """The node and front-end images, built only when no image has the same inputs."""
    client = client or docker.from_env()
    base = base_image(client)
    base_id = client.images.get(base).id
    with tempfile.TemporaryDirectory(prefix="gproc-harness-ctx-") as tmp:
        ctx = Path(tmp)
        tag = digest(_context(ctx), base_id)
        images = Images(node=f"{NODE_REPO}:{tag}", frontend=f"{FRONTEND_REPO}:{tag}")
        for target, ref in (("node", images.node), ("frontend", images.frontend)):
            if not _has_image(client, ref):
                _build(client, ctx, target, ref, base)
    return images


def _build(client: docker.DockerClient, ctx: Path, target: str, ref: str, base: str) -> None:
    """Legacy ``docker build`` of one stage, streaming its steps as progress."""
    say(f"building {ref} (target {target}, base {base})")
    log: list[str] = []
    stream = client.api.build(
        path=str(ctx),
        tag=ref,
        target=target,
        buildargs={"BASE": base},
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            tail = "".join(log[-15:])
            raise ImageError(f"docker build of {ref} failed: {chunk['error']}\n{tail}")
        text = chunk.get("stream", "")
        log.append(text)
        if text.startswith("Step "):
            say(text.strip())
