"""SSH into the node containers, so ``gproc-deploy`` can be tested against a real sshd.

Per cluster the harness makes two ed25519 keys in its run directory: the front-end's client
key (its public half is every node's authorized key) and ONE host key shared by all nodes.
One host key lets the front-end's ``known_hosts`` list every node by name and address with
the same key, one line per host: paramiko, under Fabric, does not understand the wildcard
patterns OpenSSH accepts there.

Nodes mount the host key and ``authorized_keys`` read-only at ``/etc/gproc/ssh`` and start
sshd from their container command, so a restarted container has sshd again without any
help. sshd is told everything on its command line (no image change per setting): the key,
where the authorized keys are, root by key only, and no PAM (PAM's loginuid module fails in
a container without CAP_AUDIT_CONTROL and would close every session).
"""

from __future__ import annotations

import io
import os
import shlex
import tarfile
import time
from pathlib import Path

from .plan import Plan

SSH_DIR = "/etc/gproc/ssh"  # on nodes, mounted read-only
HOST_KEY = f"{SSH_DIR}/ssh_host_ed25519_key"
AUTHORIZED_KEYS = f"{SSH_DIR}/authorized_keys"
SSHD_PID = "/run/sshd.pid"  # /run is a tmpfs: a restarted container starts without it
SSHD_LOG = "/var/log/sshd.log"
CLIENT_KEY = "/root/.ssh/id_ed25519"  # on the front-end; paramiko's look_for_keys finds it
KNOWN_HOSTS = "/root/.ssh/known_hosts"
SSHD_ARGV = [
    "/usr/sbin/sshd",
    "-h",
    HOST_KEY,
    "-E",
    SSHD_LOG,
    "-o",
    f"AuthorizedKeysFile={AUTHORIZED_KEYS}",
    "-o",
    "PermitRootLogin=prohibit-password",
    "-o",
    "PasswordAuthentication=no",
    "-o",
    "UsePAM=no",
]
# As for the gproc pid file: a pid names our sshd only if its command line says so.
SSHD_RUNNING = f"p=$(cat {SSHD_PID} 2>/dev/null) && grep -q sshd /proc/$p/cmdline 2>/dev/null"
START_SSHD = f"{SSHD_RUNNING} || {{ mkdir -p /run/sshd && {shlex.join(SSHD_ARGV)}; }}"
STOP_SSHD = f"if {SSHD_RUNNING}; then kill $p; rm -f {SSHD_PID}; fi"
# The node container's command: sshd (it daemonizes), then the container's long sleep.
NODE_COMMAND = ["sh", "-c", f"{START_SSHD}; exec sleep infinity"]

# Run on the front-end: which nodes' sshd does not greet within the timeout. It dials from
# where gproc-deploy dials, so a node cut off the network counts as down, as it should.
PROBE = """
import socket, sys
from concurrent.futures import ThreadPoolExecutor
def greets(addr):
    try:
        with socket.create_connection((addr, 22), timeout=float(sys.argv[1])) as s:
            s.settimeout(float(sys.argv[1]))
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False
pairs = [a.split("=") for a in sys.argv[2:]]
with ThreadPoolExecutor(32) as ex:
    for (name, _), ok in zip(pairs, ex.map(greets, [a for _, a in pairs])):
        if not ok:
            print(name)
"""


class SshKeyError(RuntimeError):
    """The SSH keys cannot be made (the message says what to install)."""


def _keypair() -> tuple[bytes, bytes]:
    """A fresh ed25519 key: (OpenSSH private key, ``ssh-ed25519 AAAA...`` public line)."""
    try:
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise SshKeyError(
            "the harness makes SSH keys with 'cryptography': pip install -e '.[test,harness]'"
        ) from None
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    return private, public


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write with the final mode from the start: a private key is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(mode)


def make_keys(where: Path, plan: Plan) -> None:
    """``where/nodes`` (host key, authorized_keys) and ``where/frontend`` (client key,
    known_hosts naming every node and its address)."""
    nodes, front = where / "nodes", where / "frontend"
    nodes.mkdir(parents=True, exist_ok=True)
    front.mkdir(parents=True, exist_ok=True)
    host_private, host_public = _keypair()
    client_private, client_public = _keypair()
    _write(nodes / "ssh_host_ed25519_key", host_private, 0o600)
    _write(nodes / "ssh_host_ed25519_key.pub", host_public + b"\n", 0o644)
    _write(nodes / "authorized_keys", client_public + b" gproc-harness-frontend\n", 0o644)
    _write(front / "id_ed25519", client_private, 0o600)
    _write(front / "id_ed25519.pub", client_public + b"\n", 0o644)
    lines = [f"{n.name},{n.address} {host_public.decode()}\n" for n in plan.nodes]
    _write(front / "known_hosts", "".join(lines).encode(), 0o644)


def frontend_archive(where: Path) -> bytes:
    """A tar of root's ``.ssh`` for the front-end (``put_archive`` at ``/``), modes kept."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        top = tarfile.TarInfo("root/.ssh")
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
        tar.addfile(top)
        for name in ("id_ed25519", "id_ed25519.pub", "known_hosts"):
            path = where / "frontend" / name
            info = tarfile.TarInfo(f"root/.ssh/{name}")
            info.size, info.mode = path.stat().st_size, path.stat().st_mode & 0o777
            info.mtime = top.mtime
            tar.addfile(info, io.BytesIO(path.read_bytes()))
    return buf.getvalue()


def probe_argv(pairs: list[tuple[str, str]], timeout: float = 2.0) -> list[str]:
    """The front-end command that prints the names, of ``(name, address)``, sshd is not up on."""
    return ["python3", "-c", PROBE, str(timeout), *(f"{n}={a}" for n, a in pairs)]
