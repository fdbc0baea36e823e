"""The `mobynit` command's own mistakes, as a new user makes them: one line, exit status 2.

Run as a user would, in a child process (`python -m mobynit`); the oracle is
the text a person needs: what is wrong and, where a near name exists, which
one was meant.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mobynit.core.assemble import find_extensions
from mobynit.core.cmdline import Cmdline
from mobynit.core.options import closest
from mobynit.core.paths import store_paths


def _mobynit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mobynit", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "said"), [
    (("plan", "--sysroot", "/nonexistent/sysroot"), "mobynit: error: --sysroot /nonexistent/sysroot: no such directory"),
    (("plan", "--sysroot", "/", "--data-store", "/x"), "mobynit: error: --data-store needs --data (the data partition it belongs to)"),
    (("plan", "--sysrot", "/"), "mobynit: error: plan: unknown option '--sysrot' (did you mean --sysroot?); see mobynit plan --help"),
    (("assemble", "--taget", "/x"), "mobynit: error: assemble: unknown option '--taget' (did you mean --target?); see mobynit assemble --help"),
    (("plan", "--frobnicate"), "mobynit: error: plan: unknown option '--frobnicate'; see mobynit plan --help"),
    (("plna",), "mobynit: error: unknown command 'plna' (did you mean plan?); commands: plan, mount, assemble, confirm,"
                " index, merge, unmerge, refresh, list, boot, status"),
])
def test_mistakes_are_one_line_with_status_2(args: tuple[str, ...], said: str) -> None:
    out = _mobynit(*args)
    assert (out.returncode, out.stderr, out.stdout) == (2, said + "\n", "")


def test_closest_is_near_or_nothing() -> None:
    assert closest("--jsn", ["--json", "--target"]) == "--json"
    assert closest("--x", ["--json", "--target"]) is None
    assert closest("staus", ["status", "mount"]) == "status"


def test_an_engine_root_given_as_the_data_partition_is_named(tmp_path: Path) -> None:
    engine = tmp_path / "docker"
    (engine / "containers").mkdir(parents=True)
    (engine / "overlay2").mkdir()
    found, _, why = find_extensions(store_paths(str(tmp_path / "sysroot"), str(engine)), Cmdline(""), "6.1.0")
    assert found == []
    assert why == (f"{engine} is an engine's data-root (it has containers/), not a data partition: give the partition"
                   " that holds it, or the store with --data-store: hostapp only")
