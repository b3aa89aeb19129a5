"""gproc.elf against real binaries: the host's own, and small ones compiled here so that
RPATH/RUNPATH/$ORIGIN cases can be checked against what glibc's loader really does."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from gproc.elf import (
    Closure,
    ClosureError,
    _ld_so_conf,
    _nss_services,
    closure,
    find_program,
    is_elf,
    resolve_in_root,
)

GREET_C = '#include <stdio.h>\nvoid greet(void) { puts("hello"); }\n'
MID_C = "void greet(void);\nvoid mid(void) { greet(); }\n"
HELLO_C = "void greet(void);\nint main(void) { greet(); return 0; }\n"
CHAIN_C = "void mid(void);\nint main(void) { mid(); return 0; }\n"

needs_gcc = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="gcc is not installed: cannot build test binaries"
)


def _elf_info(host_path: str) -> tuple[str | None, str | None, list[str]]:
    """(PT_INTERP, DT_SONAME, DT_NEEDED) read with the full pyelftools API, independently of
    the code under test."""
    with open(host_path, "rb") as f:
        elf = ELFFile(f)
        interp = next((s.get_interp_name() for s in elf.iter_segments("PT_INTERP")), None)
        dynamic = elf.get_section_by_name(".dynamic")
        if dynamic is None:
            return interp, None, []
        tags = list(dynamic.iter_tags())
    soname = next((t.soname for t in tags if t.entry.d_tag == "DT_SONAME"), None)
    return interp, soname, [t.needed for t in tags if t.entry.d_tag == "DT_NEEDED"]


def _assert_complete(c: Closure, root: str = "/") -> None:
    """Every object exists inside the root and every DT_NEEDED is satisfied by one of them."""
    provided: set[str] = set()
    needed: set[str] = set()
    for obj in c.objects:
        host = resolve_in_root(root, obj)
        assert host.startswith(root.rstrip("/") + "/"), (obj, host)
        _, soname, deps = _elf_info(host)
        provided |= {os.path.basename(obj), *([soname] if soname else [])}
        needed |= set(deps)
    assert needed <= provided, f"unresolved: {needed - provided}"


def _cc(*args: str | Path) -> None:
    result = subprocess.run(["gcc", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _source(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Libraries and programs linked in the ways the tests need:

    app/lib/libgreet.so and app/private/libgreet.so (the same library in two places),
    app/mid/libmid.so (needs libgreet.so and has no search path of its own),
    app/bin/hello (RUNPATH $ORIGIN/../lib), app/bin/hello_plain (no path),
    app/bin/chain_rpath and chain_runpath (need libmid; path $ORIGIN/../mid:$ORIGIN/../private
    as DT_RPATH or DT_RUNPATH, so libgreet.so is reachable only through the RPATH chain).
    """
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build test binaries")
    base = Path(os.path.realpath(tmp_path_factory.mktemp("elf")))
    src, app = base / "src", base / "app"
    for d in (src, app / "bin", app / "lib", app / "private", app / "mid"):
        d.mkdir(parents=True)
    greet = _source(src, "greet.c", GREET_C)
    for lib in ("lib", "private"):
        _cc("-shared", "-fPIC", "-Wl,-soname,libgreet.so", "-o", app / lib / "libgreet.so", greet)
    priv = app / "private"
    mid = _source(src, "mid.c", MID_C)
    _cc("-shared", "-fPIC", "-o", app / "mid/libmid.so", mid, f"-L{priv}", "-lgreet")
    hello, lib = _source(src, "hello.c", HELLO_C), f"-L{app / 'lib'}"
    runpath = "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib"
    _cc("-o", app / "bin/hello", hello, lib, "-lgreet", runpath)
    _cc("-o", app / "bin/hello_plain", hello, lib, "-lgreet")
    chain = [
        _source(src, "chain.c", CHAIN_C),
        f"-L{app / 'mid'}",
        "-lmid",
        f"-Wl,-rpath-link,{priv}",
    ]
    both = "-rpath,$ORIGIN/../mid:$ORIGIN/../private"
    _cc("-o", app / "bin/chain_rpath", *chain, f"-Wl,--disable-new-dtags,{both}")
    _cc("-o", app / "bin/chain_runpath", *chain, f"-Wl,--enable-new-dtags,{both}")
    return app


def _run(program: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(program)], capture_output=True, text=True)


# --- host binaries ----------------------------------------------------------------------


def test_date_resolves_completely() -> None:
    c = closure("/bin/date")
    interp, _, _ = _elf_info("/bin/date")
    assert c.program == "/bin/date"
    assert c.interp == interp
    assert c.objects[:2] == ["/bin/date", interp]
    libc = next(o for o in c.objects if os.path.basename(o) == "libc.so.6")
    assert os.path.dirname(libc) in c.libdirs
    assert len(set(c.libdirs)) == len(c.libdirs)
    _assert_complete(c)
    # One copy per file: the loader is not loaded again by libc's DT_NEEDED on it.
    assert len({os.path.realpath(o) for o in c.objects}) == len(c.objects)


def test_python_resolves_completely() -> None:
    exe = os.path.realpath(sys.executable)
    c = closure(exe)
    assert c.program == exe
    _assert_complete(c)


def test_adds_glibc_dlopened_libraries_when_present() -> None:
    c = closure("/bin/date")
    libc_dir = os.path.dirname(next(o for o in c.objects if o.endswith("/libc.so.6")))
    wanted = [f"libnss_{s}.so.2" for s in _nss_services("/")] + ["libgcc_s.so.1"]
    present = {n for n in wanted if os.path.exists(os.path.join(libc_dir, n))}
    assert present <= {os.path.basename(o) for o in c.objects}


# --- compiled programs: RUNPATH, RPATH chain, -L, skipping ------------------------------


def test_runpath_origin(app: Path) -> None:
    assert _run(app / "bin/hello").stdout == "hello\n"
    c = closure(str(app / "bin/hello"))
    assert str(app / "lib/libgreet.so") in c.objects
    assert c.libdirs[0] == str(app / "lib")
    _assert_complete(c)


def test_rpath_of_program_serves_libraries_of_libraries(app: Path) -> None:
    assert _run(app / "bin/chain_rpath").stdout == "hello\n"
    c = closure(str(app / "bin/chain_rpath"))
    assert str(app / "mid/libmid.so") in c.objects
    assert str(app / "private/libgreet.so") in c.objects
    _assert_complete(c)


def test_runpath_does_not_serve_libraries_of_libraries(app: Path) -> None:
    assert "libgreet.so" in _run(app / "bin/chain_runpath").stderr  # glibc agrees
    with pytest.raises(ClosureError, match=r"libgreet\.so \(needed by .*/libmid\.so\)"):
        closure(str(app / "bin/chain_runpath"))


def test_missing_library_names_it_and_the_remedy(app: Path) -> None:
    with pytest.raises(ClosureError) as info:
        closure(str(app / "bin/hello_plain"))
    message = str(info.value)
    assert message.startswith(f"libgreet.so (needed by {app}/bin/hello_plain) not found")
    assert "-L" in message and "-f" in message


def test_extra_dirs_find_library(app: Path) -> None:
    c = closure(str(app / "bin/hello_plain"), extra_dirs=[str(app / "private")])
    assert str(app / "private/libgreet.so") in c.objects
    assert str(app / "private") in c.libdirs
    _assert_complete(c)


def test_extra_dirs_come_before_runpath(app: Path) -> None:
    c = closure(str(app / "bin/hello"), extra_dirs=[str(app / "private")])
    assert str(app / "private/libgreet.so") in c.objects
    assert str(app / "lib/libgreet.so") not in c.objects


def test_skip_missing(app: Path) -> None:
    c = closure(str(app / "bin/hello_plain"), skip_missing=True)
    names = [os.path.basename(o) for o in c.objects]
    assert "libgreet.so" not in names
    assert "libc.so.6" in names


def test_wrong_kind_candidates_are_skipped(app: Path, tmp_path: Path) -> None:
    good = app / "lib/libgreet.so"
    data = good.read_bytes()
    bad = {
        "text": b"INPUT(-lgreet)\n",  # like a linker script named as a library
        "machine": data[:18] + (183).to_bytes(2, "little") + data[20:],  # EM_AARCH64
        "class": data[:4] + b"\x01" + data[5:],  # ELFCLASS32
        "endian": data[:5] + b"\x02" + data[6:],  # ELFDATA2MSB
    }
    for name, content in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "libgreet.so").write_bytes(content)
    (tmp_path / "dir" / "libgreet.so").mkdir(parents=True)  # a directory is not a library
    dirs = [str(tmp_path / n) for n in [*bad, "dir"]]
    c = closure(str(app / "bin/hello_plain"), extra_dirs=[*dirs, str(good.parent)])
    assert str(good) in c.objects
    assert not any(o.startswith(str(tmp_path)) for o in c.objects)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="$LIB/$PLATFORM values are x86_64's")
def test_lib_and_platform_tokens(app: Path, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib64/x86_64").mkdir(parents=True)
    shutil.copy(app / "lib/libgreet.so", tmp_path / "lib64/x86_64")
    hello = _source(tmp_path, "hello.c", HELLO_C)
    runpath = "-Wl,--enable-new-dtags,-rpath,${ORIGIN}/../$LIB/$PLATFORM"
    _cc("-o", tmp_path / "bin/hello", hello, f"-L{app / 'lib'}", "-lgreet", runpath)
    c = closure(str(tmp_path / "bin/hello"))
    assert str(tmp_path / "lib64/x86_64/libgreet.so") in c.objects


@needs_gcc
def test_static_binary(tmp_path: Path) -> None:
    source = _source(tmp_path, "s.c", "int main(void) { return 0; }\n")
    result = subprocess.run(
        ["gcc", "-static", "-o", str(tmp_path / "s"), str(source)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip("gcc cannot link statically here (no libc.a)")
    program = str(tmp_path / "s")
    assert closure(program) == Closure(program, None, [program], [])


# --- another root -----------------------------------------------------------------------


@pytest.fixture
def date_root(tmp_path: Path) -> tuple[str, Closure]:
    """A root holding /bin/date's host closure, with the loader behind an absolute symlink
    and libc only in a private directory that only ld.so.conf.d names."""
    host = closure("/bin/date")
    root = tmp_path / "root"
    for obj in host.objects:
        dest = obj
        if os.path.basename(obj) == "libc.so.6":
            dest = "/opt/private/lib/libc.so.6"
        elif obj == host.interp:
            dest = "/lib/loader/" + os.path.basename(obj)
            link = root / obj.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(dest)
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(obj), target)
    (root / "etc/ld.so.conf.d").mkdir(parents=True)
    (root / "etc/ld.so.conf").write_text("# test\ninclude /etc/ld.so.conf.d/*.conf\n")
    (root / "etc/ld.so.conf.d/private.conf").write_text("/opt/private/lib\n")
    (root / "etc/nsswitch.conf").write_text("passwd: files\n")
    return str(root), host


def test_root_resolves_inside_root(date_root: tuple[str, Closure]) -> None:
    root, host = date_root
    c = closure("/bin/date", root=root)
    assert c.interp == host.interp
    assert resolve_in_root(root, c.interp) == f"{root}/lib/loader/{os.path.basename(c.interp)}"
    assert "/opt/private/lib/libc.so.6" in c.objects
    assert "/opt/private/lib" in c.libdirs
    for obj in c.objects:
        assert resolve_in_root(root, obj).startswith(root + "/")
    _assert_complete(c, root)
    # The root's nsswitch.conf decides which libnss_* are added, not the host's.
    nss = {os.path.basename(o) for o in c.objects if "/libnss_" in o}
    assert nss == {os.path.basename(o) for o in host.objects if o.endswith("/libnss_files.so.2")}


def test_root_nss_module_with_missing_dependency_is_not_fatal(
    date_root: tuple[str, Closure], app: Path, tmp_path: Path
) -> None:
    root, _ = date_root
    private = Path(root, "opt/private/lib")
    module = private / "libnss_gptest.so.2"  # needs libgreet.so, absent from the root
    nss = _source(tmp_path, "nss.c", MID_C)
    _cc("-shared", "-fPIC", "-o", module, nss, f"-L{app / 'lib'}", "-lgreet")
    Path(root, "etc/nsswitch.conf").write_text("passwd: files [NOTFOUND=return] gptest\n")
    c = closure("/bin/date", root=root)
    assert "/opt/private/lib/libnss_gptest.so.2" in c.objects
    assert not any(o.endswith("/libgreet.so") for o in c.objects)
    shutil.copy(app / "lib/libgreet.so", private)
    assert "/opt/private/lib/libgreet.so" in closure("/bin/date", root=root).objects


def test_root_missing_library_is_not_taken_from_host(date_root: tuple[str, Closure]) -> None:
    root, _ = date_root
    os.remove(f"{root}/opt/private/lib/libc.so.6")
    with pytest.raises(ClosureError, match=rf"libc\.so\.6 .* not found under root {root}"):
        closure("/bin/date", root=root)


# --- paths, programs, configuration -----------------------------------------------------


def test_resolve_in_root_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("inside\n")
    (root / "up").symlink_to("../../../../../..")
    (root / "abs").symlink_to("/etc")
    (root / "loop").symlink_to("loop")
    inside = f"{root}/etc/hostname"
    assert resolve_in_root(str(root), "/../../etc/hostname") == inside
    assert resolve_in_root(str(root), "/up/etc/hostname") == inside
    assert resolve_in_root(str(root), "/abs/hostname") == inside
    for missing in ("/../../etc/passwd", "/up/etc/passwd", "/loop", "/etc/hostname/x"):
        with pytest.raises(FileNotFoundError):
            resolve_in_root(str(root), missing)


def test_resolve_in_host_root_is_realpath() -> None:
    for path in ("/bin/date", "/lib64", "/bin/../bin/date"):
        if os.path.exists(path):
            assert resolve_in_root("/", path) == os.path.realpath(path)


def test_ld_so_conf_includes_and_globs(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "real.d").mkdir(parents=True)
    (etc / "ld.so.conf.d").symlink_to("/etc/real.d")  # absolute: must stay inside the root
    (etc / "ld.so.conf").write_text(
        "# top\n/usr/local/lib   # trailing comment\n"
        "include ld.so.conf.d/*.conf\n"
        "include /etc/extra.conf /etc/missing.conf\n"
        "hwcap 0 nosegneg\n"
        "relative/dir\n"
        "include /etc/ld.so.conf\n"
    )
    (etc / "real.d/b.conf").write_text("/b\ninclude ../ld.so.conf\n")
    (etc / "real.d/a.conf").write_text("/a\n")
    (etc / "real.d/.hidden.conf").write_text("/hidden\n")
    (etc / "real.d/other.txt").write_text("/other\n")
    (etc / "extra.conf").write_text("/extra/\n\n")
    assert _ld_so_conf(str(tmp_path)) == ["/usr/local/lib", "/a", "/b", "/extra"]
    assert _ld_so_conf(str(tmp_path / "nowhere")) == []


def test_nsswitch_services(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    assert _nss_services(str(tmp_path)) == ["files", "dns"]  # glibc's default without a file
    (tmp_path / "etc/nsswitch.conf").write_text(
        "# comment: ignored\n"
        "passwd: files [NOTFOUND=return] systemd\n"
        "hosts:  files mdns4_minimal [NOTFOUND=return SUCCESS=continue] dns # tail\n"
        "netgroup: nis\n"
    )
    assert _nss_services(str(tmp_path)) == ["files", "systemd", "mdns4_minimal", "dns", "nis"]


def test_find_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = find_program("date")
    assert found.endswith("/date") and os.access(found, os.X_OK)
    root = tmp_path / "root"
    (root / "opt/bin").mkdir(parents=True)
    (root / "opt/bin/tool").write_text("#!/bin/sh\n")
    (root / "opt/bin/tool").chmod(0o755)
    (root / "opt/bin/data").write_text("not executable\n")
    assert find_program("tool", root=str(root), path_env="/nope:/opt/bin") == "/opt/bin/tool"
    with pytest.raises(ClosureError, match="^data: "):
        find_program("data", root=str(root), path_env="/opt/bin")
    with pytest.raises(ClosureError, match="^no-such-program-xyz: "):
        find_program("no-such-program-xyz")
    monkeypatch.chdir(root)
    assert find_program("./opt/bin/tool") == f"{root}/opt/bin/tool"
    assert find_program("opt/bin/tool", root=str(root)) == "/opt/bin/tool"


def test_is_elf_and_non_elf_program(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    assert is_elf("/bin/date")
    assert not is_elf(str(script))
    assert not is_elf(str(tmp_path / "missing"))
    with pytest.raises(ClosureError, match="not an ELF"):
        closure(str(script))
    with pytest.raises(ClosureError, match="not found"):
        closure(str(tmp_path / "missing"))
