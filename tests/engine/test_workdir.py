"""One assembly at a time per work directory; an interrupted one leaves nothing that changes the next.

Each test is a real `mobynit assemble` on the standard device (stores the
engine wrote), in the test's private mount namespace. The oracle for
"nothing changed" is a clean run of the same command: the same extensions
included, and the kernel's mount table (mountinfo) showing exactly one root
at the target and nothing left in the work directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mobynit.core import syscalls
from tests.harness import mounts
from tests.runs import ABI, assembled, layout_args, mobynit

# Run the CLI, but die by SIGKILL right after the N-th mount(2) succeeded (or the root's: "root"):
# a run killed part-way.
KILLER = """
import os, signal, sys
from mobynit.core import plan
done = [0]
real = plan.Mount.execute
def execute(self):
    real(self)
    done[0] += 1
    when = os.environ["KILL_AFTER_MOUNTS"]
    if (self.owner == plan.ROOT) if when == "root" else done[0] == int(when):
        os.kill(os.getpid(), signal.SIGKILL)
plan.Mount.execute = execute
from mobynit.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _args(device, tmp_path: Path) -> list[str]:
    return ["assemble", *layout_args(device), "--target", str(tmp_path / "root"), "--workdir", str(tmp_path / "work"),
            "--no-record", "--cmdline", f"{ABI}={device.abi_id}", "--kernel-release", device.kernel_release,
            "--layout", "nested"]


def _killed_after(device, tmp_path: Path, mounts_done: int | str) -> None:
    (tmp_path / "root").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", KILLER, *_args(device, tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "KILL_AFTER_MOUNTS": str(mounts_done)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _included(record: dict) -> list[str]:
    return sorted(e["name"] for e in record["extensions"] if e["included"])


def test_a_run_killed_part_way_leaves_nothing_that_changes_the_next(device, tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    with assembled(device, tmp_path / "clean", f"{ABI}={device.abi_id}", extra=("--layout", "nested")) as (_, clean, _):
        expected = _included(clean)
    run = tmp_path / "run"
    run.mkdir()
    _killed_after(device, run, 3)  # three images mounted under the work directory, no root yet
    left = mounts.mounts_under(str(run / "work"))
    assert len(left) == 3, "the killed run was meant to leave its intermediate mounts"
    with assembled(device, run, f"{ABI}={device.abi_id}", extra=("--layout", "nested")) as (_, record, stderr):
        assert _included(record) == expected, stderr
        assert record["fallbacks"] == []
        points = [m.mount_point for m in mounts.mountinfo()]
        assert points.count(str(run / "root")) == 1


def test_a_target_already_mounted_is_refused_not_stacked(device, tmp_path: Path) -> None:
    _killed_after(device, tmp_path, "root")  # the root mounted, killed before detaching the images
    assert os.path.ismount(tmp_path / "root")
    try:
        out = mobynit(*_args(device, tmp_path)[0:], check=False)
        assert out.returncode == 1
        assert out.stderr == f"mobynit: error: {tmp_path / 'root'} is already a mount point: unmount it first (a root is never mounted on a root)\n"
        assert [m.mount_point for m in mounts.mountinfo()].count(str(tmp_path / "root")) == 1
    finally:
        syscalls.umount(str(tmp_path / "root"), syscalls.MNT_DETACH)
        for m in sorted(mounts.mounts_under(str(tmp_path / "work")), key=lambda m: len(m.mount_point), reverse=True):
            syscalls.umount(m.mount_point, syscalls.MNT_DETACH)


def test_a_second_run_on_a_busy_work_directory_is_turned_away(device, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "root").mkdir()
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running mobynit holds it
        out = mobynit(*_args(device, tmp_path), check=False)
    finally:
        os.close(fd)
    assert out.returncode == 1
    assert out.stderr == (f"mobynit: error: work directory {work} is in use by another mobynit: wait for it to finish,"
                          " or give this one another --workdir\n")
    assert not os.path.ismount(tmp_path / "root")
