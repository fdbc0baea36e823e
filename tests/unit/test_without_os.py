"""The boot path does without the `os` module (its import costs ~1 ms of every boot):
its path arithmetic (mobynit.core.paths) and file tests (mobynit.core.fileio) are
checked here against the standard library's own, posixpath and os, as the oracle."""

from __future__ import annotations

import os
import posixpath
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mobynit.core import fileio, paths

REPO = Path(__file__).resolve().parents[2]
# Paths made of the pieces that matter: slashes (one, two, three), dots, and names.
PIECES = st.sampled_from(["", "/", "//", "///", ".", "..", "a", "bc", "a.b", "..."])
PATHS = st.lists(PIECES, max_size=8).map("".join)


@settings(max_examples=600, deadline=None)
@given(PATHS)
@example("//a/../..")
@example("a/b/../../..")
def test_path_arithmetic_is_posixpaths(path: str) -> None:
    assert paths.split(path) == posixpath.split(path)
    assert paths.dirname(path) == posixpath.dirname(path)
    assert paths.basename(path) == posixpath.basename(path)
    assert paths.normpath(path) == posixpath.normpath(path)


@settings(max_examples=300, deadline=None)
@given(PATHS, st.lists(PATHS, max_size=4))
def test_join_is_posixpaths(path: str, names: list[str]) -> None:
    assert paths.join(path, *names) == posixpath.join(path, *names)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """One of each kind of entry, and symlinks to each (one dangling, one in a loop)."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    for name in ("dir", "file", "fifo", "missing"):
        (tmp_path / f"to-{name}").symlink_to(name)
    (tmp_path / "loop").symlink_to("loop")
    return tmp_path


def test_file_tests_are_os_paths(tree: Path) -> None:
    names = [p.name for p in tree.iterdir()] + ["missing", "dir/missing", "file/below", "to-dir/", "to-file/"]
    assert len(names) > 10
    for name in names:
        path = str(tree / name)
        got = (fileio.exists(path), fileio.lexists(path), fileio.is_dir(path), fileio.is_file(path), fileio.is_link(path))
        want = (os.path.exists(path), os.path.lexists(path), os.path.isdir(path), os.path.isfile(path),
                os.path.islink(path))
        assert got == want, name
    assert not fileio.exists("a\0b") and not fileio.is_dir("a\0b")  # os.path answers False here too


def test_realpath_is_os_paths_where_something_is(tree: Path) -> None:
    for name in ("dir", "file", "fifo", "to-dir", "to-file", "to-dir/", "dir/../file", "to-dir/.."):
        path = str(tree / name)
        assert fileio.realpath(path) == os.path.realpath(path), name
    for name in ("missing", "to-missing", "loop"):
        with pytest.raises(OSError):
            fileio.realpath(str(tree / name))  # where nothing is, nothing is said to be there


def test_make_dirs_is_os_makedirs(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for how, top in (("ours", tmp_path / "ours"), ("os", tmp_path / "os")):
            deep = top / "a" / "b" / "c"
            if how == "ours":
                fileio.make_dirs(str(deep), 0o700)
                fileio.make_dirs(str(deep), 0o700)  # already there: nothing to do
                fileio.make_dirs(str(top / "a") + "/", 0o700)  # a trailing slash
            else:
                os.makedirs(deep, 0o700, exist_ok=True)
                os.makedirs(deep, 0o700, exist_ok=True)
                os.makedirs(str(top / "a") + "/", 0o700, exist_ok=True)
        for rel in ("", "a", "a/b", "a/b/c"):
            modes = {stat.S_IMODE((top / rel).stat().st_mode) for top in (tmp_path / "ours", tmp_path / "os")}
            assert len(modes) == 1, (rel, modes)
    finally:
        os.umask(old)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "to-dir").symlink_to("ours")
    fileio.make_dirs(str(tmp_path / "to-dir" / "a" / "b" / "."))  # through a symlink to a directory, to a "."
    os.makedirs(tmp_path / "to-dir" / "a" / "b" / ".", exist_ok=True)
    assert (tmp_path / "ours" / "a" / "b").is_dir()
    for target in (tmp_path / "file", tmp_path / "file" / "below", tmp_path / "dangling", tmp_path / "dangling" / "sub"):
        with pytest.raises(OSError) as ours:
            fileio.make_dirs(str(target))
        with pytest.raises(OSError) as theirs:
            os.makedirs(target, exist_ok=True)
        assert type(ours.value) is type(theirs.value), target


def test_the_boot_entry_never_loads_os() -> None:
    """What /init and `mobynit assemble` import, then a whole assemble's modules: `os` is not among them."""
    code = ("import sys; import mobynit.initrd.boot, mobynit.tools.cli, mobynit.core.assemble, mobynit.core.layers, "
            "mobynit.core.images, mobynit.core.sysext, mobynit.core.fanout, mobynit.core.compat; "
            "print(sorted(m for m in ('os', 'posixpath', '_collections_abc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout == "[]\n", out.stdout


def test_a_mount_point_is_found_through_a_symlink_and_nowhere_else(tmp_path: Path) -> None:
    """is_mount_point against the kernel's own table, the way mount(2) resolves its target."""
    from mobynit.core import syscalls
    from mobynit.core.mounttable import is_mount_point

    (tmp_path / "point").mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "link").symlink_to("point")
    syscalls.mount("none", str(tmp_path / "point"), "tmpfs", 0, "")
    try:
        assert is_mount_point(str(tmp_path / "point")) and is_mount_point(str(tmp_path / "link"))
        # the standard library's verdict: a mount point, and the symlink leads there
        assert os.path.ismount(tmp_path / "point") and os.path.realpath(tmp_path / "link") == str(tmp_path / "point")
        assert not is_mount_point(str(tmp_path / "plain"))
        assert not is_mount_point(str(tmp_path / "missing"))
    finally:
        syscalls.umount(str(tmp_path / "point"))
