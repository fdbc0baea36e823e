"""Running the mobynit CLI from tests: as a subprocess, in the test's own mount namespace."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.harness import mounts
from mobynit.core import syscalls

ABI = "balena_kernel_abi"


def mobynit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mobynit", *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def layout_args(dev, data: bool = True) -> list[str]:
    args = ["--sysroot", str(dev.sysroot)]
    if data:
        args += ["--data", str(dev.data)]
    return args


def plan(dev, cmdline: str = "", *, release: str | None = None, data: bool = True, extra: tuple[str, ...] = ()) -> dict:
    release = release or _release(dev)
    proc = mobynit("plan", *layout_args(dev, data), "--cmdline", cmdline, "--kernel-release", release, "--json", *extra)
    return json.loads(proc.stdout)


def by_name(doc: dict) -> dict[str, dict]:
    return {e["name"]: e for e in doc["extensions"]}


@contextlib.contextmanager
def assembled(dev, tmp_path: Path, cmdline: str = "", *, release: str | None = None, data: bool = True, extra: tuple[str, ...] = ()) -> Iterator[tuple[Path, dict, str]]:
    """Assemble a root in this test's namespace; yield (root, record, stderr); detach it after."""
    target = tmp_path / "root"
    target.mkdir(exist_ok=True)
    work = tmp_path / "work"
    record = tmp_path / "boot.json"
    proc = mobynit(
        "assemble", *layout_args(dev, data), "--target", str(target), "--workdir", str(work),
        "--record", str(record), "--cmdline", cmdline, "--kernel-release", release or _release(dev), *extra,
    )
    try:
        assert not mounts.mounts_under(str(work)), "intermediate mounts were left in the work directory"
        yield target, json.loads(record.read_text()), proc.stderr
    finally:
        syscalls.umount(str(target), syscalls.MNT_DETACH)


def read(root: Path, rel: str) -> str | None:
    path = root / rel
    return path.read_text() if path.exists() else None


def _release(dev) -> str:
    """The standard device's modules were built for its own release; others take the host's."""
    return getattr(dev, "kernel_release", None) or os.uname().release
