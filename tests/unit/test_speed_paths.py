"""The boot path's short cuts mean what the long way means.

Each test holds a fast form to an independent oracle: the path-list check to
the rule stated path by path; libc bound through `_ctypes` to what the kernel
then shows in /proc/self/mountinfo; the quick exit to what a parent process
reads from the pipe and the exit status; the store's descriptor-relative
reading to the calls it really makes (every lstat and open, recorded).
"""

from __future__ import annotations

import os
import posix
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobynit.core import facts
from mobynit.core.errors import StoreError
from mobynit.core.store import Store
from tests.unit.test_store_chain import CID, LAYER, LINK, MOUNT_ID, _store

REPO = Path(__file__).resolve().parents[2]


def _one_by_one(p: object) -> bool:
    """The rule, stated path by path: a non-empty relative path of real names."""
    if not isinstance(p, str) or not p or "\0" in p or p.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in p.split("/"))


_part = st.sampled_from(["a", "usr", ".", "..", "", "...", ".a", "a.", "\0", "x\0y", "\n", "é"])
_path = st.one_of(st.lists(_part, max_size=4).map("/".join), st.text(max_size=8))
_item = st.one_of(_path, _path.map(lambda p: "/" + p), _path.map(lambda p: p + "/"), st.integers(), st.none())


@given(st.lists(_item, max_size=6))
def test_the_joined_path_check_is_the_path_by_path_rule(items: list[object]) -> None:
    assert facts.all_valid_paths(items) == all(_one_by_one(p) for p in items)


def test_the_one_marker_search_finds_both_labels() -> None:
    from mobynit.core import labels, store

    assert all(marker.startswith(store._MARKER_HEAD) for marker in labels.MARKERS)


def test_the_path_check_examples() -> None:
    assert facts.all_valid_paths([]) and facts.all_valid_paths(["usr", "usr/share/x", "...", ".a"])
    for bad in ("", "/usr", "usr/", "a//b", ".", "..", "a/./b", "a/..", "a\0b", 1, None):
        assert not facts.all_valid_paths(["usr", bad]), bad


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_libc_through_ctypes_c_module_mounts_and_says_errno() -> None:
    code = (
        "import os, sys\n"
        "from mobynit.core import syscalls as s\n"
        "s.unshare(s.CLONE_NEWNS)\n"
        "s.mount(None, '/', None, s.MS_REC | s.MS_PRIVATE)\n"
        "d = sys.argv[1]\n"
        "s.mount('tmpfs', d, 'tmpfs', s.MS_NOSUID, 'size=1m')\n"
        "fd = s.fsopen('tmpfs'); s.fsconfig_string(fd, 'size', '2m'); s.fsconfig_create(fd)\n"
        "m = s.fsmount(fd, s.MOUNT_ATTR_RDONLY); s.move_mount_to(m, d)\n"
        "print(sum(line.split()[4] == d for line in open('/proc/self/mountinfo')))\n"
        "os.close(m); os.close(fd); s.umount(d); s.umount(d)\n"
        "try:\n    s.umount(d)\nexcept OSError as e:\n    print(e.errno, e.strerror)\n"
        "print('ctypes' in sys.modules)\n"
    )
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"mobynit-syscalls-{os.getpid()}"
    d.mkdir()
    try:
        proc = subprocess.run([sys.executable, "-S", "-c", code, str(d)], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.split("\n")
    finally:
        d.rmdir()
    assert out[0] == "2"  # the tmpfs, and the fsmount on top of it
    assert out[1] == f"22 umount {d}: Invalid argument"  # nothing left there: EINVAL, said with the call
    assert out[2] == "False"  # the ctypes package was never imported


def _finish(code: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-S", "-c", f"from mobynit.core import process\n{code}"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)


def test_finish_flushes_both_streams_and_keeps_the_status() -> None:
    proc = _finish("import sys; sys.stdout.write('out'); sys.stderr.write('err'); process.finish(3)\nprint('after')")
    assert (proc.stdout, proc.stderr, proc.returncode) == (b"out", b"err", 3)


def test_finish_says_an_unflushable_stdout_as_the_interpreter_would() -> None:
    for status in (0, 3):
        code = f"import sys; sys.stdout.write('x'); process.finish({status})"
        with open("/dev/full", "wb") as full:
            ours = subprocess.run([sys.executable, "-S", "-c", f"from mobynit.core import process\n{code}"], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=full, stderr=subprocess.PIPE)
            plain = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.stdout.write('x'); sys.exit({status})"],
                                   stdout=full, stderr=subprocess.PIPE)
        assert ours.returncode == plain.returncode == 1
        assert b"No space left on device" in ours.stderr and b"No space left on device" in plain.stderr


def test_the_short_lived_run_has_no_collector() -> None:
    proc = _finish("process.short_lived(); import gc; print(gc.isenabled())")
    assert proc.stdout == b"False\n"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every lstat, stat, open and readlink the store makes, as (call, absolute path):
    the boot path calls them from `posix` (not `os`), where the spies go."""
    seen: list[tuple[str, str]] = []
    readlink = os.readlink

    def where(path: object, dir_fd: int | None) -> str:
        base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        return os.path.normpath(os.path.join(base, os.fsdecode(path)))  # type: ignore[arg-type]

    for name in ("lstat", "stat", "open", "readlink"):
        real = getattr(posix, name)

        def spy(path, *args, _real=real, _name=name, dir_fd=None, **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(path, (str, bytes)):
                seen.append((_name, where(path, dir_fd)))
            return _real(path, *args, dir_fd=dir_fd, **kwargs) if dir_fd is not None else _real(path, *args, **kwargs)

        monkeypatch.setattr(posix, name, spy)
    return seen


def test_a_container_is_read_without_repeating_a_call_nor_looking_at_its_init_layer(tmp_path: Path, calls) -> None:
    data = tmp_path / "data"
    _store(data)
    root = data / "docker"
    (root / "overlay2" / f"{MOUNT_ID}-init" / "diff").mkdir(parents=True)
    init_link = "I" * 26
    (root / "overlay2/l" / init_link).symlink_to(f"../{MOUNT_ID}-init/diff")
    (root / "overlay2" / MOUNT_ID / "lower").write_text(f"l/{init_link}:l/{LINK}")
    c = Store(str(root)).container(CID)
    assert [layer.id for layer in c.layers] == [LAYER]
    assert len(calls) == len(set(calls)), sorted(p for p in calls if calls.count(p) > 1)
    assert not [p for _, p in calls if f"{MOUNT_ID}-init" in p]
    layer = str(root / "overlay2" / LAYER)
    assert ("lstat", layer) in calls and ("lstat", f"{layer}/diff") in calls  # what is mounted is checked


def test_the_init_layer_is_never_mounted_so_never_required(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store(data)
    root = data / "docker"
    (root / "overlay2/l" / ("I" * 26)).symlink_to(f"../{MOUNT_ID}-init/diff")  # dangling: no -init directory
    (root / "overlay2" / MOUNT_ID / "lower").write_text(f"l/{'I' * 26}:l/{LINK}")
    assert [layer.id for layer in Store(str(root)).container(CID).layers] == [LAYER]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_config_on_another_file_system_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store(data)
    cdir = data / "docker/containers" / CID
    config = (cdir / "config.v2.json").read_bytes()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(cdir)], check=True)
    try:
        (cdir / "config.v2.json").write_bytes(config)
        with pytest.raises(StoreError, match=f"^{cdir}: on another file system"):
            Store(str(data / "docker")).container(CID)
        (ext,) = Store(str(data / "docker")).scan(lambda labels: True, "6.1.0")
        assert ext.container is None and ext.fault == f"{cdir}/config.v2.json: on another file system (a mount point), not followed"
    finally:
        subprocess.run(["umount", str(cdir)], check=True)


def test_descriptors_are_closed_after_each_call(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store(data)
    before = set(os.listdir("/proc/self/fd"))
    store = Store(str(data / "docker"))
    store.container(CID)
    store.scan(lambda labels: True, "6.1.0")
    store.layers(CID)
    with pytest.raises(StoreError):
        store.container("f" * 64)
    assert set(os.listdir("/proc/self/fd")) == before


def test_every_level_between_the_partition_and_the_store_is_checked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store(tmp_path / "elsewhere")
    (data / "var").mkdir(parents=True)
    (data / "var/lib").symlink_to(tmp_path / "elsewhere")  # data/var/lib/docker reached through a symlink
    with pytest.raises(StoreError, match=f"^{data}/var/lib: is a symlink, not followed$"):
        Store(str(data / "var/lib/docker"), top=str(data)).container(CID)
    (data / "var/lib").unlink()
    shutil.copytree(tmp_path / "elsewhere", data / "var/lib", symlinks=True)
    assert Store(str(data / "var/lib/docker"), top=str(data)).container(CID).name == "ext"
