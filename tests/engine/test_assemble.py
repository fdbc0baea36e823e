"""The assembler against stores written by the real engine, with real overlay mounts.

Every test runs in its own private mount namespace (conftest); a test that
mounts a root detaches it at the end, and the fixture fails any test that
leaves a mount behind, so these also prove mobynit detaches its
intermediate mounts.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import mounts
from mobynit.core import syscalls
from tests.runs import ABI, assembled, by_name, layout_args, mobynit, plan, read

pytestmark = pytest.mark.engine

INCLUDED = {"ext-normal", "ext-override", "ext-override5", "ext-legacy", "ext-whiteout", "ext-kv-match", "ext-abi"}

# --- the hostapp ----------------------------------------------------------------------


def test_hostapp_alone_is_a_read_only_overlay_without_dockerenv(device, tmp_path: Path) -> None:
    with assembled(device, tmp_path, data=False) as (root, record, _):
        assert read(root, "etc/hostapp-file") == "hostapp\n"
        assert read(root, "usr/share/hostapp/only-in-hostapp") == "only in hostapp\n"
        assert not (root / "etc/to-delete").exists(), "the hostapp's own whiteout must hold"
        assert not (root / ".dockerenv").exists(), "the -init layer must be left out"
        assert (root / "bin/busybox").exists()
        entry = next(m for m in mounts.mountinfo() if m.mount_point == str(root))
        assert entry.fstype == "overlay"
        assert os.statvfs(root).f_flag & os.ST_RDONLY
        for attempt in (lambda: (root / "new-file").write_text("x"), lambda: (root / "etc/hostapp-file").write_text("x")):
            with pytest.raises(OSError) as err:
                attempt()
            assert err.value.errno == errno.EROFS
        assert record["hostapp"]["id"] == device.hostapp_id
        assert record["extensions"] == []
        assert record["disabled_reason"].startswith("no data partition")


def test_hostapp_layers_in_plan_are_the_image_layers_without_init(device) -> None:
    doc = plan(device, data=False)
    layers = doc["hostapp"]["layers"]
    assert len(layers) == 3  # three image layers; the never-started container's own diff is empty
    store = str(device.sysroot / "balena" / "overlay2")
    assert all(p.startswith(store + "/") and p.endswith("/diff") and "-init" not in p for p in layers)
    mount_id = (device.sysroot / "balena/image/overlay2/layerdb/mounts" / device.hostapp_id / "mount-id").read_text()
    assert f"{store}/{mount_id}-init/diff" not in layers
    assert doc["hostapp"]["name"] == "hostapp"


def test_one_layer_hostapp_mounts(device_onelayer, tmp_path: Path) -> None:
    dev = device_onelayer
    target = tmp_path / "root"
    target.mkdir()
    mobynit("assemble", "--sysroot", str(dev.sysroot), "--data", str(dev.data), "--target", str(target),
            "--workdir", str(tmp_path / "work"), "--no-record", "--cmdline", "")
    try:
        assert read(target, "etc/hostapp-file") == "onelayer\n"
        assert not (target / ".dockerenv").exists()
        with pytest.raises(OSError) as err:
            (target / "x").write_text("x")
        assert err.value.errno == errno.EROFS
    finally:
        syscalls.umount(str(target), syscalls.MNT_DETACH)


def test_mount_command_prints_only_the_path(device, tmp_path: Path) -> None:
    target = tmp_path / "inactive"
    proc = mobynit("mount", "--sysroot", str(device.sysroot), "--target", str(target), "--workdir", str(tmp_path / "w"))
    try:
        assert proc.stdout == f"{target}\n"
        assert read(target, "etc/hostapp-file") == "hostapp\n"
        assert os.statvfs(target).f_flag & os.ST_RDONLY
    finally:
        syscalls.umount(str(target), syscalls.MNT_DETACH)


def test_mount_command_default_target(device_onelayer) -> None:
    proc = mobynit("mount", "--sysroot", str(device_onelayer.sysroot))
    path = proc.stdout.strip()
    try:
        assert path == f"/run/mobynit/hostapp/{device_onelayer.hostapp_id}"
        assert read(Path(path), "etc/hostapp-file") == "onelayer\n"
    finally:
        syscalls.umount(path, syscalls.MNT_DETACH)


# --- extensions -----------------------------------------------------------------------

def test_plan_decisions_and_order(device) -> None:
    doc = plan(device, f"root=/dev/vda2 {ABI}={device.abi_id}")
    found = by_name(doc)
    assert set(found) == set(device.extensions), "every extension container is listed, no app container"
    assert {n for n, e in found.items() if e["included"]} == INCLUDED
    assert "Dead" in found["ext-dead"]["reason"]
    assert "RemovalInProgress" in found["ext-removing"]["reason"]
    assert "5.15.0" in found["ext-kv-mismatch"]["reason"]
    assert "Module.symvers" in found["ext-abi-nosymvers"]["reason"]
    assert device.wrong_abi_id in found["ext-abi-badlabel"]["reason"]
    assert all(("reason" in e) != e["included"] for e in doc["extensions"])
    assert (found["ext-override5"]["position"], found["ext-override5"]["priority"]) == ("override", 5)
    assert (found["ext-normal"]["position"], found["ext-normal"]["priority"]) == ("normal", None)
    names = [e["name"] for e in doc["extensions"]]
    assert names[:2] == ["ext-override5", "ext-override"]
    assert names[2:] == sorted(names[2:])
    assert doc["disabled_by"] is None and doc["disabled_reason"] is None
    # The root mount stacks overrides (by priority), the hostapp, then normal ones (by name).
    root = [m for m in doc["mounts"] if m["op"] == "mount" and m["owner"] == "root"]
    assert len(root) == 1 and root[0]["flags"] == ["ro"] and root[0]["target"] == "/sysroot"
    owners = {m["target"]: m["owner"] for m in doc["mounts"] if m["op"] == "mount" and m["owner"] != "root"}
    assert doc["layout"] == "nested" and "no layer facts" in doc["layout_reason"]  # the store was never indexed
    stacked = [owners[f"{root[0]['cwd']}/{d}"] for d in root[0]["options"].removeprefix("lowerdir=").split(":")]
    ids = {e["id"]: e["name"] for e in doc["extensions"]}
    assert [ids.get(o, o) for o in stacked] == [
        "ext-override5", "ext-override", "hostapp", "ext-abi", "ext-kv-match", "ext-legacy", "ext-normal", "ext-whiteout",
    ]


def test_plan_is_deterministic(device) -> None:
    assert plan(device) == plan(device)


def test_plan_text_output(device) -> None:
    out = mobynit("plan", *layout_args(device), "--cmdline", "", "--kernel-release", device.kernel_release).stdout
    assert f"hostapp hostapp ({device.hostapp_id[:12]}): " in out
    assert "extension ext-override5: included, override 5" in out
    assert "extension ext-dead: skipped: container is Dead" in out
    layout = [line for line in out.splitlines() if line.startswith("layout ")]
    assert len(layout) == 1 and layout[0].startswith("layout nested (mount), stacking depth 2: ")
    assert "no layer facts" in layout[0]  # the store was never indexed
    assert "mount -t overlay overlay /sysroot -o ro,lowerdir=" in out


def test_merged_root_precedence_and_whiteouts(device, tmp_path: Path) -> None:
    with assembled(device, tmp_path, f"{ABI}={device.abi_id}") as (root, record, stderr):
        assert read(root, "etc/hostapp-file") == "override5\n", "the override with the lowest N wins"
        for name in ("ext-normal", "ext-override", "ext-legacy", "ext-kv-match", "ext-abi"):
            assert read(root, f"usr/share/{name}/hello") == f"hello from {name}\n"
        for name in ("ext-dead", "ext-removing", "ext-kv-mismatch", "ext-abi-nosymvers", "ext-abi-badlabel"):
            assert not (root / "usr/share" / name).exists()
        assert read(root, "usr/share/hostapp/only-in-hostapp") == "only in hostapp\n"
        # Whiteouts and opaque directories act inside the extension that carries them.
        assert not (root / "usr/share/ext-whiteout/a").exists()
        assert read(root, "usr/share/ext-whiteout/b") == "b\n"
        assert sorted(os.listdir(root / "usr/share/ext-whiteout/opaque")) == ["new"]
        assert not (root / ".dockerenv").exists()
        with pytest.raises(OSError) as err:
            (root / "usr/share/ext-normal/hello").write_text("x")
        assert err.value.errno == errno.EROFS
        assert "mobynit: extension ext-dead: skipped: container is Dead" in stderr
        assert "mobynit: extension ext-override5: included, override 5" in stderr
        assert sorted(e["name"] for e in record["extensions"] if e["included"]) == sorted(INCLUDED)
        assert record["fallbacks"] == []


def test_normal_extension_cannot_replace_hostapp_files(device_copy, tmp_path: Path) -> None:
    for name in ("ext-override", "ext-override5"):
        subprocess.run(["rm", "-rf", str(device_copy.data / "docker/containers" / device_copy.extensions[name])], check=True)
    with assembled(device_copy, tmp_path) as (root, record, _):
        assert read(root, "etc/hostapp-file") == "hostapp\n"
        assert read(root, "usr/share/ext-normal/hello") == "hello from ext-normal\n"


# --- switches and markers ---------------------------------------------------------------

SWITCHES = ("balena.nohostext", "balena.disable_overlays", "mobynit.no_overlays")


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("value", ["", "=1", "=y", "=yes", "=true", "=on", "=ON", "=maybe"])
def test_switch_disables_extensions(device, switch: str, value: str) -> None:
    doc = plan(device, f"root=/dev/vda2 {switch}{value} quiet")
    assert doc["disabled_by"] == f"{switch}{value}"
    assert doc["extensions"] == []
    assert all(m["owner"] == "hostapp" for m in doc["mounts"])


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("value", ["=0", "=n", "=no", "=false", "=off", "=Off"])
def test_switch_off_keeps_extensions(device, switch: str, value: str) -> None:
    doc = plan(device, f"{switch}{value}")
    assert doc["disabled_by"] is None
    assert INCLUDED - {"ext-abi"} <= {e["name"] for e in doc["extensions"] if e["included"]}


@pytest.mark.parametrize(
    "cmdline,disabled",
    [
        ("emergency", "emergency"),
        ("systemd.unit=emergency.target", "systemd.unit=emergency.target"),
        ("foo.emergency_x", None),
        ("xbalena.nohostext balena.nohostextra mobynit.no_overlays_x=1", None),
        ("systemd.unit=multi-user.target", None),
        ('balena.nohostext "balena.nohostext=0"', None),  # the last occurrence wins
        ("balena.nohostext=0 balena.nohostext", "balena.nohostext"),
        ("root=/dev/vda2 -- balena.nohostext", None),  # after --, for init, not the kernel
    ],
)
def test_other_disabling_forms(device, cmdline: str, disabled: str | None) -> None:
    assert plan(device, cmdline)["disabled_by"] == disabled


def test_switch_in_a_real_assemble(device, tmp_path: Path) -> None:
    with assembled(device, tmp_path, "balena.disable_overlays") as (root, record, stderr):
        assert read(root, "etc/hostapp-file") == "hostapp\n"
        assert not (root / "usr/share/ext-normal").exists()
        assert record["disabled_by"] == "balena.disable_overlays"
        assert "disabled by balena.disable_overlays" in stderr


def test_missing_purge_marker_skips_extensions(device_copy, tmp_path: Path) -> None:
    (device_copy.data / "remove_me_to_reset").unlink()
    doc = plan(device_copy)
    assert doc["extensions"] == [] and "remove_me_to_reset" in doc["disabled_reason"]
    with assembled(device_copy, tmp_path) as (root, _, _):
        assert not (root / "usr/share/ext-normal").exists()
        assert read(root, "etc/hostapp-file") == "hostapp\n"


def test_missing_data_partition_dir(device, tmp_path: Path) -> None:
    doc = mobynit("plan", "--sysroot", str(device.sysroot), "--data", str(tmp_path / "nope"), "--cmdline", "", "--json").stdout
    assert "not found" in json.loads(doc)["disabled_reason"]


# --- kernel filters ---------------------------------------------------------------------


def test_kernel_version_follows_the_running_release(device) -> None:
    found = by_name(plan(device, release="5.15.0-91-generic"))
    assert found["ext-kv-mismatch"]["included"] and not found["ext-kv-match"]["included"]
    assert "6.1.0" in found["ext-kv-match"]["reason"] and "5.15.0" in found["ext-kv-match"]["reason"]
    # No modules for 5.15.0-91-generic: the ABI checks do not apply.
    assert found["ext-abi-nosymvers"]["included"] and found["ext-abi-badlabel"]["included"]


def test_abi_token_must_match_module_symvers(device) -> None:
    found = by_name(plan(device, f"{ABI}={device.wrong_abi_id}"))
    assert not found["ext-abi"]["included"]
    assert ABI in found["ext-abi"]["reason"] and device.abi_id in found["ext-abi"]["reason"]
    assert by_name(plan(device, f"{ABI}={device.abi_id}"))["ext-abi"]["included"]
    # No token on the command line: the ABI cannot be checked, and the extension stays out.
    unchecked = by_name(plan(device, ""))["ext-abi"]
    assert not unchecked["included"], "an ABI that cannot be checked must fail closed"
    assert f"no {ABI}= on the kernel command line" in unchecked["reason"] and device.abi_id in unchecked["reason"]


# --- page size ----------------------------------------------------------------------------


# Drops under the page size and the 500-layer limit: tests/engine/test_capacity.py, on a store with 500 extensions.


def test_hostapp_that_cannot_fit_is_an_error(device) -> None:
    proc = mobynit("plan", *layout_args(device), "--cmdline", "", "--page-size", "64", "--json", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("mobynit: error: ") and "hostapp" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
