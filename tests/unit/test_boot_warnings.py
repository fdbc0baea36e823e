"""Boot's word on what it could not use: bad numbers on the command line
(said once, with the default that applies) and an extension store that
cannot be read (said, with the reason in the record, never an empty store)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from mobynit.core import assemble as assembler
from mobynit.core import attempts
from mobynit.core.cmdline import Cmdline
from mobynit.core.paths import store_paths
from mobynit.initrd.boot import Boot
from mobynit.initrd.console import Console


def _boot(tmp_path: Path, cmdline: str) -> tuple[Boot, Console]:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    console = Console(str(kmsg), io.StringIO(), devkmsg_sysctl=str(tmp_path / "none"), printk_sysctl=str(tmp_path / "none"))
    return Boot(Cmdline(cmdline), console, None), console


@pytest.mark.parametrize("value", ["abc", "-1", "1e9", "nan"])
def test_a_bad_wait_is_said_once_with_its_default(tmp_path, value):
    boot, console = _boot(tmp_path, f"root=LABEL=x mobynit.wait={value}")
    assert boot.wait() == 30.0 and boot.wait() == 30.0  # asked for the root, then for the data partition
    assert console.lines == [f"mobynit: mobynit.wait={value} is not a number of seconds from 0 to 3600; "
                             "using the default, 30 s"]


def test_a_good_wait_is_silent(tmp_path):
    boot, console = _boot(tmp_path, "mobynit.wait=2.5")
    assert boot.wait() == 2.5 and console.lines == []


@pytest.mark.parametrize("value", ["x", "0", "-2", "99999", "2.5", "٣"])
def test_a_bad_max_tries_is_said_with_its_default(value):
    said: list[str] = []
    assert attempts.max_tries(value, said.append) == attempts.DEFAULT_MAX_TRIES
    assert said == [f"mobynit.max_tries={value} is not a whole number from 1 to 999; using the default, 3"]


def test_a_good_or_absent_max_tries_is_silent():
    said: list[str] = []
    assert [attempts.max_tries(v, said.append) for v in (None, "1", "7")] == [3, 1, 7] and said == []


# --- the extension store ----------------------------------------------------------------


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "remove_me_to_reset").write_text("")
    return data


def _find(data: Path):
    where = store_paths(str(tmp_root(data)), str(data))
    return assembler.find_extensions(where, Cmdline(""), os.uname().release)


def tmp_root(data: Path) -> Path:
    return data.parent / "sysroot"


def test_docker_that_is_a_file_is_said(tmp_path):
    data = _data(tmp_path)
    (data / "docker").write_text("not a store\n")
    found, token, why = _find(data)
    assert found == [] and token is None
    assert why == f"extension store unreadable ({data}/docker: not a directory): hostapp only"


def test_containers_that_is_a_symlink_is_said(tmp_path):
    data = _data(tmp_path)
    (data / "docker").mkdir()
    (data / "docker/containers").symlink_to("/etc")
    _, _, why = _find(data)
    assert why == f"extension store unreadable ({data}/docker/containers: is a symlink, not followed): hostapp only"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory; the guest test damages one instead")
def test_containers_that_cannot_be_read_is_said(tmp_path):
    data = _data(tmp_path)
    (data / "docker/containers").mkdir(parents=True)
    os.chmod(data / "docker/containers", 0)
    try:
        _, _, why = _find(data)
    finally:
        os.chmod(data / "docker/containers", 0o755)
    assert why.startswith(f"extension store unreadable ({data}/docker/containers: cannot open: Permission denied")


@pytest.mark.parametrize("make", ["nothing", "docker only"])
def test_a_fresh_store_is_empty_and_silent(tmp_path, make):
    data = _data(tmp_path)
    if make == "docker only":
        (data / "docker").mkdir()
    assert _find(data) == ([], None, None)


def test_the_reason_boot_gives_replaces_the_generic_line():
    where = store_paths("/nonexistent")
    why = "no partition of disk vda (the root partition's) carries LABEL=resin-data (vda2: no ext2/3/4 file system)"
    assert assembler.find_extensions(where, Cmdline(""), "6.1.0", why)[2] == f"{why}: hostapp only"
    assert assembler.find_extensions(where, Cmdline(""), "6.1.0")[2] == "no data partition given: hostapp only"
