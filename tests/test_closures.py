"""The client's cache of packed programs: a repeat run reads no ELF and hashes nothing, and
any change to what the answer was read from (a library, a directory, ld.so.conf) or a cache
file another user could have written makes the client work the answer out again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgpack
import pytest

from gproc import closures, elf
from gproc.digest import digest_bytes


@pytest.fixture
def root(tmp_path: Path) -> str:
    """A root holding /bin/true's closure, with libc found through ld.so.conf, and an empty
    directory that -L names (searched before everything else)."""
    host = elf.closure("/bin/true")
    top = tmp_path / "root"
    for obj in host.objects:
        target = top / obj.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(obj), target)
    (top / "etc").mkdir(exist_ok=True)
    (top / "etc/ld.so.conf").write_text("")
    (top / "opt/first").mkdir(parents=True)
    return str(top)


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "home" / ".cache" / "gproc" / "closures")


def packed(root: str, cache: str) -> dict[str, str]:
    """Each shipped file's path and the sha256 the client would send for it."""
    p = closures.pack("/bin/true", root, ["/opt/first"], False, cache)
    assert p is not None
    return {e.path: e.sha256.hex() for e in p.entries if e.kind == "f"}


def libc(files: dict[str, str]) -> tuple[str, str]:
    return next((p, h) for p, h in files.items() if p.endswith("/libc.so.6"))


def parsing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*args: object, **kw: object) -> None:
        raise AssertionError("the ELF closure was worked out again")

    monkeypatch.setattr(elf, "closure", no)


def test_a_repeat_run_reads_no_elf(root: str, cache: str, monkeypatch) -> None:
    first = packed(root, cache)
    assert os.stat(cache).st_mode & 0o777 == 0o600
    parsing_fails(monkeypatch)
    assert packed(root, cache) == first


def test_a_changed_library_is_hashed_again(root: str, cache: str) -> None:
    path, digest = libc(packed(root, cache))
    lib = Path(root, path)
    with open(lib, "ab") as f:
        f.write(b"\0")
    assert libc(packed(root, cache)) == (path, digest_bytes(lib.read_bytes()).hex())


def test_a_library_rewritten_with_its_times_put_back_is_hashed_again(root: str, cache: str) -> None:
    path, _ = libc(packed(root, cache))
    lib = Path(root, path)
    st = lib.stat()
    data = bytearray(lib.read_bytes())
    data[-1] ^= 0xFF
    lib.write_bytes(bytes(data))
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert libc(packed(root, cache))[1] == digest_bytes(data).hex()


def test_a_library_put_earlier_in_the_search_is_found(root: str, cache: str) -> None:
    path, _ = libc(packed(root, cache))
    shutil.copy(Path(root, path), Path(root, "opt/first/libc.so.6"))
    assert libc(packed(root, cache))[0] == "opt/first/libc.so.6"


def test_a_directory_ld_so_conf_adds_is_searched(root: str, cache: str) -> None:
    path, _ = libc(packed(root, cache))
    Path(root, "opt/conf").mkdir()
    shutil.copy(Path(root, path), Path(root, "opt/conf/libc.so.6"))
    assert libc(packed(root, cache))[0] == path, "not named anywhere yet"
    Path(root, "etc/ld.so.conf").write_text("/opt/conf\n")
    assert libc(packed(root, cache))[0] == "opt/conf/libc.so.6"


def forge(cache: str) -> None:
    """Rewrite every cached hash (as another user with write access could)."""
    body = msgpack.unpackb(Path(cache).read_bytes())
    for record in body["programs"].values():
        for entry in record["entries"]:
            entry[4] = bytes(32)
    Path(cache).write_bytes(msgpack.packb(body))


def test_a_forged_cache_others_could_write_is_not_believed(root: str, cache: str) -> None:
    first = packed(root, cache)
    forge(cache)
    os.chmod(cache, 0o666)
    assert packed(root, cache) == first


def test_a_cache_in_a_directory_others_could_write_is_not_believed(root: str, cache: str) -> None:
    first = packed(root, cache)
    forge(cache)
    os.chmod(os.path.dirname(os.path.dirname(cache)), 0o777)  # ~/.cache, not sticky
    assert packed(root, cache) == first


def test_a_cache_that_is_a_symlink_is_not_believed(root: str, cache: str, tmp_path: Path) -> None:
    first = packed(root, cache)
    forge(cache)
    elsewhere = tmp_path / "forged"
    os.rename(cache, elsewhere)
    os.symlink(elsewhere, cache)
    assert packed(root, cache) == first


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the file to another user needs root")
def test_a_cache_of_another_users_is_not_believed(root: str, cache: str) -> None:
    first = packed(root, cache)
    forge(cache)
    os.chown(cache, 65534, 65534)
    assert packed(root, cache) == first


def test_a_garbled_cache_is_a_miss_and_is_replaced(root: str, cache: str) -> None:
    first = packed(root, cache)
    Path(cache).write_bytes(b"\xc1 not msgpack")
    assert packed(root, cache) == first
    assert closures.load(cache), "written anew"
