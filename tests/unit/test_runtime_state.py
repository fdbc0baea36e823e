"""The runtime's state root under attack: what is planted there is never followed,
and `delete --force` forgets a container whatever its state directory holds.

Every call is the real CLI in a child process (tests/unit/test_runtime.py's `Rt`);
the oracle is the file system outside the root: a planted symlink's target
must be exactly as it was (same names, same bytes) after every call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobynit.core import fileio
from mobynit.core.errors import StoreError
from tests.unit.test_runtime import Bundle, Rt, create, exit_status, leftovers, reaper, rt  # noqa: F401 (fixtures)


def snapshot(top: Path) -> dict[str, bytes | str]:
    """Every entry under `top`: a file's bytes, a directory or symlink by kind and target."""
    seen: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            seen[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return seen


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory outside the runtime root that a planted symlink points at."""
    d = tmp_path / "victim"
    (d / "sub").mkdir(parents=True)
    (d / "state.json").write_text('{"precious": true}')
    (d / "sub" / "file").write_text("keep me")
    return d


def test_a_symlinked_state_dir_is_never_followed_and_force_forgets_it(rt: Rt, tmp_path: Path, victim: Path) -> None:
    rt.root.mkdir()
    (rt.root / "ext1").symlink_to(victim)
    before = snapshot(victim)
    for call in (("state", "ext1"), ("start", "ext1"), ("kill", "ext1", "KILL"), ("delete", "ext1")):
        assert "container ext1 does not exist" in rt.fail(*call)
    rt("delete", "--force", "ext1")
    assert snapshot(victim) == before
    assert leftovers(rt) == []  # the symlink itself is gone, its target is not


def test_create_replaces_a_planted_symlink_instead_of_writing_through_it(rt: Rt, tmp_path: Path, victim: Path) -> None:
    rt.root.mkdir()
    (rt.root / "ext1").symlink_to(victim)
    (rt.root / "ext1.lock").symlink_to(victim / "state.json")
    before = snapshot(victim)
    pid = create(rt, Bundle(tmp_path))
    assert snapshot(victim) == before
    assert (rt.root / "ext1").is_dir() and not (rt.root / "ext1").is_symlink()
    assert rt.state("ext1")["status"] == "created"
    rt("delete", "--force", "ext1")
    assert exit_status(pid) == 137
    assert snapshot(victim) == before and leftovers(rt) == []


def test_a_symlinked_state_file_is_refused_by_name_and_forgotten_by_force(rt: Rt, tmp_path: Path, victim: Path) -> None:
    pid = create(rt, Bundle(tmp_path))
    state = rt.root / "ext1" / "state.json"
    state.unlink()
    state.symlink_to(victim / "state.json")
    before = snapshot(victim)
    msg = rt.fail("state", "ext1")
    assert f"state file {state}: cannot open: Too many levels of symbolic links" in msg
    assert "Too many levels" in rt.fail("delete", "ext1")  # without --force: refused, named
    rt("delete", "--force", "ext1")
    assert any("forgot extension ext1 although its state is unreadable" in e["msg"]
               for e in rt.entries() if e["level"] == "warning")
    assert snapshot(victim) == before and leftovers(rt) == []
    os.kill(pid, 9)
    exit_status(pid)


def test_force_forgets_whatever_the_state_dir_holds(rt: Rt, tmp_path: Path, victim: Path) -> None:
    """A subdirectory, a symlink to outside in it, a FIFO, a corrupt state: forgotten all the same."""
    b = Bundle(tmp_path)
    pid = create(rt, b)
    d = rt.root / "ext1"
    (d / "junk" / "deeper").mkdir(parents=True)
    (d / "junk" / "deeper" / "out").symlink_to(victim)
    (d / "junk" / "file").write_text("x")
    os.mkfifo(d / "fifo")
    (d / "state.json").write_text("{torn")
    before = snapshot(victim)
    assert "is not valid JSON" in rt.fail("delete", "ext1")
    rt("delete", "--force", "ext1")
    assert leftovers(rt) == [] and snapshot(victim) == before
    os.kill(pid, 9)
    exit_status(pid)
    # A directory planted where the state file belongs, for a container never created.
    (rt.root / "ext2" / "state.json" / "x").mkdir(parents=True)
    rt("delete", "--force", "ext2")
    assert leftovers(rt) == []


def test_a_fifo_or_directory_at_the_lock_name_never_blocks(rt: Rt, tmp_path: Path) -> None:
    rt.root.mkdir()
    os.mkfifo(rt.root / "ext1.lock")
    (rt.root / "ext2.lock").mkdir()
    pid1 = create(rt, Bundle(tmp_path), "ext1")  # run_files has a 120 s timeout: a block fails the test
    pid2 = create(rt, Bundle(tmp_path, "b2"), "ext2")
    for cid, pid in (("ext1", pid1), ("ext2", pid2)):
        rt("delete", "--force", cid)
        assert exit_status(pid) == 137
    assert leftovers(rt) == []


def test_a_symlinked_root_is_refused(rt: Rt, tmp_path: Path, victim: Path) -> None:
    rt.root.symlink_to(victim)
    before = snapshot(victim)
    msg = rt.fail("delete", "--force", "ext1")
    assert f"runtime root {rt.root}: not a directory (a symlink or a file), not followed" in msg
    assert snapshot(victim) == before


def test_write_atomic_at_replaces_a_planted_temporary(tmp_path: Path, victim: Path) -> None:
    """Our own temporary's name (ours by pid) planted as a symlink or a FIFO: replaced, never followed or opened."""
    d = tmp_path / "dir"
    d.mkdir()
    fd = fileio.open_dir(str(d))
    try:
        (d / f"state.json.{os.getpid()}.tmp").symlink_to(victim / "state.json")
        fileio.write_atomic_at(fd, "state.json", b"new")
        assert (d / "state.json").read_bytes() == b"new" and sorted(os.listdir(d)) == ["state.json"]
        os.mkfifo(d / f"state.json.{os.getpid()}.tmp")
        fileio.write_atomic_at(fd, "state.json", b"newer")
        assert (d / "state.json").read_bytes() == b"newer" and sorted(os.listdir(d)) == ["state.json"]
        assert (victim / "state.json").read_text() == '{"precious": true}'
        assert fileio.remove_at(fd, "state.json") and not fileio.remove_at(fd, "state.json")
    finally:
        os.close(fd)
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(StoreError, match="not a directory .* not followed"):
        fileio.open_dir(str(tmp_path / "link"))


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_the_log_is_never_written_through_a_symlink_or_into_a_fifo(tmp_path: Path, planted: str) -> None:
    from mobynit.runtime.log import Log

    log_path = tmp_path / "log.json"
    outside = tmp_path / "outside"
    outside.write_text("")
    if planted == "symlink":
        log_path.symlink_to(outside)
    else:
        os.mkfifo(log_path)
        reader = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK)  # a reader: a plain open would succeed
    try:
        Log(str(log_path), "json")("error", "it failed")
    finally:
        if planted == "fifo":
            assert os.read(reader, 100) == b""
            os.close(reader)
    assert outside.read_text() == ""
