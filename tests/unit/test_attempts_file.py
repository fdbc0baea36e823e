"""The attempts file under hostile state: never a hang, never a write outside the partition, never disabled for good.

The data partition is a directory made here; what is planted in it (a FIFO,
a symlink, a directory) is the attack, and the oracle is the file system
afterwards: the count written where it belongs, nothing written where the
symlink pointed, every call returning within its deadline.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mobynit.core import attempts
from mobynit.core.attempts import NONE, Attempts

A = "a" * 64
SOME = Attempts(extensions=(A,), unconfirmed=1, fallback=False)


@pytest.fixture(autouse=True)
def deadline():
    """A call that blocks (opening a FIFO) fails the test instead of hanging it."""
    def expired(signum, frame):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_at_the_temporary_name_is_removed_not_opened(tmp_path: Path) -> None:
    where = attempts.state_path(str(tmp_path))
    (tmp_path / "mobynit").mkdir()
    os.mkfifo(tmp_path / "mobynit" / f"boot-attempts.json.{os.getpid()}.tmp")
    assert attempts.write(where, SOME) == []
    assert attempts.read(where) == SOME
    assert os.listdir(tmp_path / "mobynit") == ["boot-attempts.json"]


@pytest.mark.parametrize("planted", ["dir", "symlink", "file"])
def test_whatever_is_at_the_temporary_name_never_disables_the_count(tmp_path: Path, planted: str) -> None:
    where = attempts.state_path(str(tmp_path))
    (tmp_path / "mobynit").mkdir()
    tmp = tmp_path / "mobynit" / f"boot-attempts.json.{os.getpid()}.tmp"
    outside = tmp_path / "outside"
    outside.write_text("keep")
    if planted == "dir":
        (tmp / "sub").mkdir(parents=True)
    elif planted == "symlink":
        tmp.symlink_to(outside)
    else:
        tmp.write_text("stale")
    attempts.write(where, SOME)
    assert attempts.read(where) == SOME
    assert outside.read_text() == "keep"


def test_a_symlinked_state_directory_is_replaced_and_nothing_lands_outside(tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (data / "mobynit").symlink_to(elsewhere)
    where = attempts.state_path(str(data))
    assert attempts.read(where) == NONE  # not followed to read either
    assert attempts.write(where, SOME) == [f"{data}/mobynit"]
    assert os.listdir(elsewhere) == []
    assert (data / "mobynit").is_dir() and not (data / "mobynit").is_symlink()
    assert attempts.read(where) == SOME


def test_a_fifo_as_the_attempts_file_reads_as_no_history(tmp_path: Path) -> None:
    (tmp_path / "mobynit").mkdir()
    os.mkfifo(tmp_path / "mobynit" / "boot-attempts.json")
    where = attempts.state_path(str(tmp_path))
    assert attempts.read(where) == NONE
    attempts.write(where, SOME)  # replaced by rename: the count goes on
    assert attempts.read(where) == SOME


def test_a_file_named_below_the_data_partition_is_checked_from_the_partition(tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (data / "mobynit").symlink_to(elsewhere)
    where = attempts.named(str(data / "mobynit" / "boot-attempts.json"), str(data))
    assert where == attempts.state_path(str(data))
    assert attempts.write(where, SOME) == [f"{data}/mobynit"]
    assert os.listdir(elsewhere) == []
