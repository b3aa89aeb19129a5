"""One node over SSH (Fabric over paramiko): connect with timeouts, run, upload.

Failures come out as two kinds, because an operator acts on them differently: the host
could not be reached or not trusted (:class:`Unreachable`: network, sshd, authentication,
host key), or it was reached and something there failed (:class:`Failed`).
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

ACCEPT_SWITCH = "--accept-new-host-keys"
RUN = f"{os.getpid()}-{secrets.token_hex(3)}"  # this gproc-deploy run, in temporary names


@dataclass(frozen=True)
class SshOptions:
    user: str | None = None
    identity: str | None = None
    port: int = 22
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    remote_dir: str = "/tmp/gproc-deploy"
    accept_new_host_keys: bool = False
    known_hosts: str | None = None  # default ~/.ssh/known_hosts


class Unreachable(Exception):
    """The node could not be reached, or not trusted: unreachable."""


class Failed(Exception):
    """The node was reached but a step failed there: failed."""


class Remote:
    """An open SSH connection to one node; use as a context manager."""

    def __init__(self, name: str, address: str, opts: SshOptions):
        self.name = name
        self.address = address
        self.opts = opts
        self.conn = None

    def __enter__(self) -> Remote:
        import fabric
        import paramiko

        o = self.opts
        kwargs = {"allow_agent": False, "look_for_keys": o.identity is None}
        if o.identity:
            kwargs["key_filename"] = [o.identity]
        conn = fabric.Connection(
            self.address,
            user=o.user,
            port=o.port,
            connect_timeout=int(o.connect_timeout),
            connect_kwargs=kwargs,
        )
        known = o.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        if os.path.exists(known):
            # into the in-memory set only: paramiko's own saving rewrites the whole file,
            # and 32 threads doing that at once lose keys
            conn.client.get_host_keys().load(known)
            _known_by_name(conn.client.get_host_keys(), self.name, self.address, o.port)
        if o.accept_new_host_keys:
            conn.client.set_missing_host_key_policy(_RememberNewKeys(known))
        else:
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            conn.open()
        except paramiko.BadHostKeyException:
            raise Unreachable(
                f"host key of {self.address} changed; check the node, then "
                f"remove its old key from {known}"
            ) from None
        except paramiko.AuthenticationException as e:
            raise Unreachable(f"authentication failed ({e}); check --user and --identity") from None
        except paramiko.SSHException as e:
            if "No existing session" in str(e):
                raise Unreachable(
                    f"the SSH key exchange with {self.address} did not finish "
                    "within --connect-timeout"
                ) from None
            if "not found in known_hosts" in str(e):
                raise Unreachable(
                    f"unknown host key for {self.address} (not in {known}); "
                    f"check it, or pass {ACCEPT_SWITCH}"
                ) from None
            raise Unreachable(f"ssh: {e}") from None
        except (TimeoutError, OSError) as e:
            raise Unreachable(
                f"cannot connect to {self.address}:{o.port}: "
                f"{getattr(e, 'strerror', None) or e or 'timed out'}"
            ) from None
        self.conn = conn
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def run(self, command: str) -> str:
        """Run a shell command; its stdout, or Failed with the last line of its stderr."""
        from invoke.exceptions import CommandTimedOut

        try:
            result = self.conn.run(
                command, hide=True, warn=True, in_stream=False, timeout=self.opts.command_timeout
            )
        except CommandTimedOut:
            raise Failed(f"command timed out after {self.opts.command_timeout:.0f}s") from None
        except (OSError, EOFError) as e:
            raise Unreachable(f"connection lost: {e}") from None
        if result.exited != 0:
            why = (result.stderr.strip().splitlines() or [f"exit status {result.exited}"])[-1]
            raise Failed(why)
        return result.stdout

    def upload(self, local: Path, remote: str, mode: int) -> None:
        """Copy a file to a temporary name, set its mode, and move it into place."""
        tmp = f"{remote}.tmp-{RUN}"  # a run's own temporary: two runs never share one
        try:
            self.conn.put(str(local), tmp)
        except (OSError, EOFError) as e:
            raise Failed(f"upload of {local.name} failed: {e}") from None
        self.run(f"chmod {mode:o} {tmp} && mv -f {tmp} {remote}")


def _known_by_name(keys, name: str, address: str, port: int) -> None:  # noqa: ANN001
    """Match the host key by name as ssh does: a known_hosts line for ``kn5`` alone vouches
    for the address gproc-deploy connects to, unless a line for the address says otherwise
    (then that key must match, as before)."""

    def entry(host: str) -> str:
        return host if port == 22 else f"[{host}]:{port}"

    by_name = keys.lookup(entry(name))
    if by_name is not None and keys.lookup(entry(address)) is None:
        for kind in list(by_name):
            keys.add(entry(address), kind, by_name[kind])


_known_hosts_lock = threading.Lock()


class _RememberNewKeys:
    """Trust an unknown host key and append it to known_hosts, one line, under a lock.

    paramiko hands over the name as known_hosts spells it (``[host]:port`` off port 22).
    """

    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, name: str, key) -> None:  # noqa: ANN001
        client.get_host_keys().add(name, key.get_name(), key)
        with _known_hosts_lock:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
