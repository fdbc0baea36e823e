"""Live layering in a booted Debian (docs/live.md), under QEMU, in one boot.

The device is the Debian hostapp of qemu/debian.py, indexed so that it boots
flat, with sysext images on its data partition (`qemu.debian_live.live_inputs`). Its
probe (`qemu.debian_live.LIVE_PROBE`) merges them with the guest's own systemd-sysext
and with `mobynit merge`, unmerging between, lists /usr after each step, then
refreshes with a reader running, and installs a live-capable container
extension with `docker run --runtime extension`. The oracles are the guest's
kernel (its mount table for /usr), the trees read through /usr by a lister
that shares no code with mobynit (`qemu.debian_live.TREE`), and systemd-sysext itself.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.boot import kit as boot_kit

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (device nodes in the initramfs, dockerd)")
    kit = boot_kit.make_kit(tmp_path_factory.mktemp("boot"), lambda line: sys.stderr.write(f"\n{line}\n"))
    kit.boot(["debian-live"])
    res = kit.results["debian-live"]
    assert res.returncode == 0 and res.console.mark("done") is not None, res.describe()
    return res


def labelled(res, name: str) -> dict[str, str]:
    """`MARK name LABEL rest...` lines as label -> rest."""
    out = {}
    for value in res.console.marks(name):
        label, _, rest = value.partition(" ")
        out[label] = rest.strip()
    return out


def has(res, label: str) -> dict[str, str]:
    out = {}
    for value in res.console.marks("has"):
        lab, path, first = (value.split(" ", 2) + [""])[:3]
        if lab == label:
            out[path] = first
    return out


def test_the_guest_loads_squashfs_and_boots_flat(live) -> None:
    assert live.console.marks("module") == ["loop.ko loaded", "squashfs.ko loaded"], live.describe()
    record = boot_kit.boot_record(live)
    assert record is not None and record["layout"] == "flat", record and record.get("layout_reason")


def test_data_partition_images_are_in_the_root_before_init(live) -> None:
    """The initramfs loaded loop, squashfs and erofs for them and made them layers of the
    root: their files are there with nothing mounted on /usr, the refused one is said."""
    record = boot_kit.boot_record(live)
    got = {e["name"]: e for e in record["extensions"]}
    for name in ("boottool", "booterofs"):
        assert got[name]["included"] and got[name]["position"] == "sysext", got[name]
    assert not got["bootbad"]["included"] and "outside /usr, /opt" in got["bootbad"]["reason"]
    assert labelled(live, "usr-mounts")["boot"] == "", live.describe()
    assert has(live, "boot") == {"/usr/share/boottool/data": "boottool data", "/usr/bin/boottool": "#!/bin/sh",
                                 "/usr/share/booterofs/data": "booterofs data", "/usr/share/bootbad/data": "missing"}
    console = live.console.text()
    assert "extension boottool: included, sysext image" in console
    assert "extension bootbad: skipped: " in console


# Found by this test: the directories of the root that an extension's layers take part in
# (/, /usr, /usr/share) could not be listed (getdents64: ENOENT) once the cleanup unit had
# removed an extension the running root was made with: its layers were gone from under the
# mount. The manager now keeps what the running root uses (tests/unit/test_manager.py).
def test_mobynit_merges_the_same_usr_as_systemd_sysext(live) -> None:
    trees = labelled(live, "tree")
    mounts = labelled(live, "usr-mounts")
    # Each tool really stacked its overlay on /usr (the kernel's mount table), and took it away.
    assert mounts["sysext"] == "overlay:sysext", mounts
    assert mounts["merged"] == "overlay:mobynit-live.1", mounts
    assert mounts["sysext-unmerged"] == mounts["unmerged"] == "", mounts
    # The differential: the same entries, types, modes, owners, contents and link targets.
    assert trees["sysext"] == trees["merged"], live.console.marks("tree-diff")
    assert live.console.marks("tree-diff") == []
    assert trees["sysext"] != trees["base"]
    assert int(trees["base"].split()[1]) > 1000, trees  # the walk saw the whole of /usr, not an empty listing
    # Unmerging gives back exactly the booted /usr, after each tool.
    assert trees["base"] == trees["sysext-unmerged"] == trees["unmerged"] == trees["final"], trees
    assert not any("error" in line.lower() for line in live.console.marks("sysext-said")), live.console.marks("sysext-said")
    listed = live.console.marks("list")
    assert any("dirtool" in line and "merge" in line for line in listed), listed
    assert any("sqtool" in line and "squashfs" in line for line in listed), listed


def test_the_flat_root_reads_its_merged_directories(live) -> None:
    """What the differential above needs first: every directory of the root can be listed."""
    said = live.console.marks("getdents")
    assert said and all(line.endswith(" ok") for line in said), said


def test_refresh_swaps_with_the_base_there_throughout(live) -> None:
    # Linux 6.1 has no MOVE_MOUNT_BENEATH: docs/live.md promises detach-then-attach
    # (`mechanism: replace`), during which the base files are all there.
    assert live.console.mark("refresh-rc") == "0", live.console.marks("refresh-said")
    assert live.console.mark("refresh") == "merged replace newtool sqtool"
    # ... the extension's files (sqtool is in both sets) may be missing for that moment.
    checks, missing, _ext_missing = (int(n) for n in live.console.mark("watch").split())
    assert checks > 0 and missing == 0, (checks, missing)
    assert labelled(live, "usr-mounts")["refreshed"] == "overlay:mobynit-live.3"
    assert has(live, "refreshed") == {"/usr/share/newtool/data": "newtool data", "/usr/share/sqtool/data": "sqtool data",
                                      "/usr/bin/dirtool": "missing"}
    assert labelled(live, "usr-mounts")["sysext-gone"] == ""


def test_a_container_extension_goes_live_at_its_start(live) -> None:
    assert live.console.mark("live-ext-run").startswith("0"), live.console.mark("live-ext-run")
    assert labelled(live, "usr-mounts")["container"].startswith("overlay:mobynit-live."), live.describe()
    assert has(live, "container") == {"/usr/share/debian-live/hello": "hello from a live extension"}
    status = live.console.marks("live-status")
    assert "live container extension live-ext: merged into /usr" in status, status
    assert has(live, "container-unmerged") == {"/usr/share/debian-live/hello": "missing"}
    assert labelled(live, "usr-mounts")["container-unmerged"] == ""
