"""Real boots: Debian's kernel under QEMU (TCG), mobynit's initramfs, disks
built by the real engine; each test asserts on what one machine printed.

The machines the selected tests need are booted together, two at a time,
by the first test that asks (see tests/boot_kit.py); console logs are in
build/boot-logs/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.boot import kit as boot_kit
from tests.boot.kit import boot_record, files

pytestmark = pytest.mark.boot

HOSTAPP_FILE = "/etc/hostapp-file"
TOGGLES = ("balena.nohostext", "balena.disable_overlays", "mobynit.no_overlays", "emergency")


def uses(*names: str):
    """Declare the scenarios a test reads, so they are booted in one batch."""
    def mark(fn):
        fn.boot_scenarios = names
        return fn
    return mark


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (device nodes in the initramfs, dockerd)")
    work = tmp_path_factory.mktemp("boot")
    yield boot_kit.make_kit(work, lambda line: sys.stderr.write(f"\n{line}\n"))
    shutil.rmtree(work, ignore_errors=True)  # disk images and stores: hundreds of MB; logs stay in build/


@pytest.fixture(scope="session")
def booted(kit: boot_kit.Kit, request: pytest.FixtureRequest):
    """booted(name) -> the finished machine of scenario `name`.

    The first call boots every scenario the session's selected tests use.
    """
    wanted: list[str] = []
    for item in request.session.items:
        fn = getattr(item, "function", None)
        wanted += getattr(fn, "boot_scenarios", ())
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "scenario" in callspec.params:
            wanted.append(callspec.params["scenario"])

    def get(name: str):
        if name not in kit.results:
            kit.boot([*wanted, name])
        return kit.results[name]

    return get


def reached_init(result) -> None:
    """The machine booted its hostapp's init, which reported and powered off."""
    assert result.returncode == 0 and result.console.mark("done") is not None, result.describe()
    assert result.console.mark("pid") == "1", result.describe()


def lines(result) -> str:
    return "\n".join(result.console.mobynit())


# --- the hostapp alone --------------------------------------------------------------


@uses("hostapp-alone")
def test_hostapp_alone_boots_read_only_overlay(booted):
    res = booted("hostapp-alone")
    reached_init(res)
    fstype, options = res.console.mark("root").split(" ", 1)
    assert fstype == "overlay"
    assert options.split(",")[0] == "ro"
    assert "Read-only file system" in res.console.mark("write-root")
    assert res.console.mark("dockerenv") == "no"
    assert res.console.mark("active").split() == ["balena", "current", "hostapps", "lost+found"]
    assert "/dev/vda1 /mnt/sysroot/active ext4 ro" in "\n".join(res.console.marks("mount"))
    assert files(res)[HOSTAPP_FILE] == "hostapp"
    assert "/etc/to-delete" not in files(res)  # the third layer's whiteout


@uses("hostapp-alone")
def test_boot_record_and_console_lines(booted):
    res = booted("hostapp-alone")
    reached_init(res)
    record = boot_record(res)
    assert record is not None, "no /run/mobynit/boot.json in the booted system"
    assert record["hostapp"]["name"] == "hostapp"
    assert record["extensions"] == []
    boot = record["boot"]
    assert boot["init"] == "/sbin/init"
    assert boot["root"] == {"spec": "LABEL=resin-rootA", "device": "/dev/vda1", "fstype": "ext4", "reason": None,
                            "ignored": []}
    assert boot["init_start"] <= boot["python_start"] <= boot["handover"]
    assert set(boot["phases"]) >= {"wait_root", "mount_root", "wait_data", "mount_data", "assemble", "move_mounts"}
    said = res.console.mobynit()
    assert "root LABEL=resin-rootA is /dev/vda1, mounted read-only" in said
    assert any(line.startswith("handing over to /sbin/init") for line in said)
    # Every console line is also in the kernel log the booted system reads.
    assert int(res.console.mark("kmsg")) == len(said)


@uses("hostapp-alone")
def test_empty_data_store_boots_the_hostapp(booted):
    res = booted("hostapp-alone")
    reached_init(res)
    assert "data LABEL=resin-data is /dev/vda2" in res.console.mobynit()
    assert "root mounted read-only at /newroot: hostapp and 0 extensions" in res.console.mobynit()


# --- extensions ------------------------------------------------------------------------


def _root_order(record: dict) -> list[str]:
    """Names of what the root overlay stacks, leftmost (highest precedence) first."""
    names = {e["id"]: e["name"] for e in record["extensions"]}
    names["hostapp"] = "hostapp"
    owner_of = {op["target"]: op["owner"] for op in record["mounts"] if op["op"] == "mkdir"}
    root = [op for op in record["mounts"] if op["op"] == "mount" and op["target"] == record["target"]][-1]
    lower = root["options"].split("lowerdir=", 1)[1].split(",")[0].split(":")
    return [names[owner_of[os.path.join(root["cwd"] or "/", d)]] for d in lower]


@uses("extensions")
def test_extensions_add_files_and_overrides_replace(booted):
    res = booted("extensions")
    reached_init(res)
    seen = files(res)
    # Normal extensions add files; their copy of a hostapp file loses.
    assert seen["/usr/share/tools/hello"] == "hello from tools"
    assert seen["/usr/share/firmware/blob"] == "firmware v2"
    assert seen["/usr/share/hostapp/only-in-hostapp"] == "only in hostapp"
    # Deletions survive the trip through the disk image: the hostapp's
    # whiteout, and an opaque directory inside an extension.
    assert "/etc/to-delete" not in seen
    assert seen["/usr/share/firmware/old/fresh"] == "v2" and "/usr/share/firmware/old/stale" not in seen
    # Overrides replace hostapp files; the lower priority number wins (5 over 10).
    assert seen[HOSTAPP_FILE] == "patched by urgent"
    assert seen["/usr/share/hotfix/note"] == "override 10"
    assert "Read-only file system" in res.console.mark("write-root")
    assert res.console.mark("dockerenv") == "no"


@uses("extensions", "flat")
def test_an_indexed_device_boots_a_flat_root_with_the_same_files(booted):
    """In the guest: the layers' facts let boot mount one overlay of every
    layer (stacking depth 1; Linux 6.1 has no lowerdir+, so mount(2) with short
    links), and the booted system sees exactly what the nested root shows."""
    flat, nested = booted("flat"), booted("extensions")
    reached_init(flat)
    record = boot_record(flat)
    assert (record["layout"], record["mechanism"], record["stacking_depth"]) == ("flat", "mount", 1), record["layout_reason"]
    assert [op["op"] for op in record["mounts"]] == ["symlinks", "mount", "unlink"]
    assert boot_record(nested)["layout"] == "nested"
    assert files(flat) == files(nested)
    assert any(line.startswith("layout flat (mount), stacking depth 1") for line in flat.console.mobynit()), lines(flat)


@uses("extensions")
def test_kernel_version_label_against_the_booted_kernel(booted, kit):
    res = booted("extensions")
    reached_init(res)
    running = kit.kernel.release.split("-")[0]
    assert files(res)["/usr/share/kmod-ok/hello"] == f"built for {running}"
    assert "/usr/share/kmod-old/hello" not in files(res)
    assert f"extension kmod-old: skipped: built for kernel 5.15.0, running kernel is {running}" in res.console.mobynit()
    assert boot_record(res)["kernel_release"] == kit.kernel.release


@uses("extensions")
def test_extensions_stack_in_the_documented_order(booted):
    res = booted("extensions")
    reached_init(res)
    record = boot_record(res)
    assert _root_order(record) == ["urgent", "hotfix", "hostapp", "firmware", "kmod-ok", "tools"]
    said = res.console.mobynit()
    for line in ("extension urgent: included, override 5", "extension hotfix: included, override 10",
                 "extension firmware: included, normal", "extension tools: included, normal",
                 "extension kmod-ok: included, normal",
                 "root mounted read-only at /newroot: hostapp and 5 extensions"):
        assert line in said, lines(res)
    # More than /dev/kmsg's burst of ten: none lost, and its rate limit given back.
    assert len(said) > 10 and int(res.console.mark("kmsg")) == len(said)
    assert res.console.mark("devkmsg") == "ratelimit"


@uses("extensions")
def test_status_prints_the_boot_record(booted, tmp_path: Path):
    res = booted("extensions")
    path = tmp_path / "boot.json"
    path.write_text(json.dumps(boot_record(res)))
    out = subprocess.run([sys.executable, "-m", "mobynit", "status", "--record", str(path)],
                         capture_output=True, text=True, cwd=boot_kit.REPO)
    assert out.returncode == 0, out.stderr
    assert "hostapp hostapp (" in out.stdout
    assert "root partition: LABEL=resin-rootA (/dev/vda1), at /mnt/sysroot/active" in out.stdout
    assert "extension urgent: included, override 5" in out.stdout
    assert "extension tools: included, normal" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "mobynit", "status", "--record", str(tmp_path / "none.json")],
                             capture_output=True, text=True, cwd=boot_kit.REPO)
    assert missing.returncode == 1, missing.stderr
    assert "no boot record at" in missing.stderr and "Traceback" not in missing.stderr


# --- kernel command line ------------------------------------------------------------


@pytest.mark.parametrize("scenario", TOGGLES)
def test_switch_disables_extensions(booted, scenario: str):
    res = booted(scenario)
    reached_init(res)
    seen = files(res)
    assert seen[HOSTAPP_FILE] == "hostapp"
    assert not any(p.startswith(("/usr/share/tools", "/usr/share/hotfix", "/usr/share/firmware")) for p in seen)
    assert f"extensions disabled by {scenario} on the kernel command line" in res.console.mobynit(), lines(res)
    record = boot_record(res)
    assert record["disabled_by"] == scenario
    # The data partition was not even mounted.
    assert record["boot"]["data"] == {"spec": "LABEL=resin-data", "device": None, "fstype": None,
                                      "reason": f"extensions disabled by {scenario}", "ignored": []}
    assert "wait_data" not in record["boot"]["phases"]


@uses("switches-off")
def test_false_values_keep_extensions_on(booted):
    res = booted("switches-off")
    reached_init(res)
    assert files(res)[HOSTAPP_FILE] == "patched by urgent"
    record = boot_record(res)
    assert record["disabled_by"] is None
    assert sum(e["included"] for e in record["extensions"]) == 5
    # Under `quiet` the lines reach the console once, written by mobynit, not echoed by the kernel.
    said = [line for _, line in res.console.lines if "mobynit: " in line]
    assert said and all(line.startswith("mobynit: ") for line in said)
    assert int(res.console.mark("kmsg")) == len(said)


@uses("names")
def test_partuuid_uuid_and_init(booted):
    res = booted("names")
    reached_init(res)
    said = res.console.mobynit()
    assert "root PARTUUID=6d6f6279-01 is /dev/vda1, mounted read-only" in said, lines(res)
    assert f"data UUID={boot_kit.disk.DATA_UUID} is /dev/vda2" in said, lines(res)
    assert res.console.mark("alt-init") == "1"  # init= ran first, as PID 1
    assert boot_record(res)["boot"]["init"] == "/sbin/init-alt"
    # mobynit.debug: the extra lines are there.
    assert any(line.startswith("command line: console=ttyS0 root=PARTUUID=") for line in said), lines(res)
    assert any(line.startswith("phases: wait_root ") for line in said), lines(res)
    assert files(res)[HOSTAPP_FILE] == "patched by urgent"


# --- degraded data partition: the hostapp still boots ----------------------------------


@uses("no-data")
def test_no_data_partition(booted):
    res = booted("no-data")
    reached_init(res)
    said = res.console.mobynit()
    # The root's disk holds one partition, and its table says so: nothing to wait for.
    assert not any(line.startswith("waiting up to") for line in said), lines(res)
    assert said.count("no partition of disk vda (the root partition's) carries LABEL=resin-data: hostapp only") == 1, lines(res)
    assert not any("no data partition given" in line for line in said), lines(res)
    assert files(res)[HOSTAPP_FILE] == "hostapp"
    assert boot_record(res)["boot"]["data"]["device"] is None


@uses("late-data")
def test_late_data_disk_is_picked_up_by_uevent(booted):
    """A data partition named by UUID may be on any disk, one that comes late too."""
    res = booted("late-data")
    reached_init(res)
    said = res.console.mobynit()
    spec = f"UUID={boot_kit.disk.DATA_UUID}"
    assert f"waiting up to 30 s for data partition {spec}" in said, lines(res)
    assert any(line.startswith(f"{spec} appeared as /dev/vdb1 after") for line in said), lines(res)
    assert f"data {spec} is /dev/vdb1, on disk vdb as named (the root partition is on vda)" in said, lines(res)
    assert files(res)[HOSTAPP_FILE] == "patched by urgent"


# --- issue 13: partitions are trusted from the root partition's disk only ----------------


def _active_device(res) -> str:
    """The device the booted system has at /mnt/sysroot/active, from its /proc/mounts."""
    found = [m.split()[0] for m in res.console.marks("mount") if m.split()[1] == "/mnt/sysroot/active"]
    assert len(found) == 1, res.describe()
    return found[0]


def _own_system(res) -> None:
    """The device's own hostapp with its own extensions, nothing of the stick."""
    reached_init(res)
    seen = files(res)
    assert seen[HOSTAPP_FILE] == "patched by urgent", lines(res)
    assert seen["/usr/share/tools/hello"] == "hello from tools"
    assert boot_kit.ROGUE_MARK not in seen
    assert boot_record(res)["hostapp"]["name"] == "hostapp"


@pytest.mark.parametrize("scenario,own,rogue", [("rogue-data-first", "vdb", "vda"), ("rogue-data-second", "vda", "vdb")])
def test_a_rogue_data_partition_on_another_disk_is_named_and_never_used(booted, scenario, own, rogue):
    res = booted(scenario)
    _own_system(res)
    assert _active_device(res) == f"/dev/{own}1"
    said = res.console.mobynit()
    assert f"data LABEL=resin-data is /dev/{own}2" in said, lines(res)
    named = [line for line in said if f"/dev/{rogue}" in line]
    assert named == [f"ignoring /dev/{rogue}1 on disk {rogue}: it carries LABEL=resin-data, but only the root "
                     f"partition's disk {own} is trusted for it"], lines(res)
    assert boot_record(res)["boot"]["data"]["device"] == f"/dev/{own}2"
    assert boot_record(res)["boot"]["data"]["ignored"] == [f"/dev/{rogue}1"]


@pytest.mark.parametrize("scenario,own,rogue", [("rogue-root-first", "vdb", "vda"), ("rogue-root-second", "vda", "vdb")])
def test_a_rogue_root_partition_on_another_disk_is_named_and_never_used(booted, scenario, own, rogue):
    res = booted(scenario)
    _own_system(res)
    assert _active_device(res) == f"/dev/{own}1"  # the kernel's view, in the booted system
    said = res.console.mobynit()
    assert f"root PARTUUID=6d6f6279-01 is /dev/{own}1, mounted read-only" in said, lines(res)
    assert f"data LABEL=resin-data is /dev/{own}2" in said, lines(res)
    assert [line for line in said if f"/dev/{rogue}" in line] == [
        f"ignoring /dev/{rogue}1 on disk {rogue}: named like the root partition (resin-rootA), but not on its disk {own}",
        f"ignoring /dev/{rogue}2 on disk {rogue}: it carries LABEL=resin-data, but only the root partition's disk "
        f"{own} is trusted for it",
    ], lines(res)
    boot = boot_record(res)["boot"]
    assert (boot["root"]["ignored"], boot["data"]["ignored"]) == ([f"/dev/{rogue}1"], [f"/dev/{rogue}2"])


@uses("ambiguous-root")
def test_an_ambiguous_root_is_refused_and_the_device_reboots(booted):
    res = booted("ambiguous-root")
    assert res.returncode == 0, res.describe()  # the panic rebooted; -no-reboot made QEMU exit
    assert res.console.mark("init-start") is None  # neither hostapp ran
    cannot = [line for line in res.console.mobynit() if line.startswith("cannot boot: ")]
    assert cannot == ["cannot boot: root partition LABEL=resin-rootA is ambiguous: /dev/vda1 on disk vda, "
                      "/dev/vdb1 on disk vdb; not guessing (name it by PARTUUID= or UUID=, or boot through "
                      "systemd-boot)"], lines(res)
    assert res.console.first("Rebooting in 1 seconds") is not None  # panic=1 from the command line is kept


@uses("data-label-elsewhere")
def test_a_data_partition_only_on_another_disk_is_not_taken_and_not_waited_for(booted):
    res = booted("data-label-elsewhere")  # mobynit.wait=600: waiting would outlast the machine
    reached_init(res)
    said = res.console.mobynit()
    assert not any(line.startswith("waiting up to") for line in said), lines(res)
    assert "ignoring /dev/vdb1 on disk vdb: it carries LABEL=resin-data, but only the root partition's disk vda " \
           "is trusted for it" in said, lines(res)
    assert "no partition of disk vda (the root partition's) carries LABEL=resin-data: hostapp only" in said
    assert files(res)[HOSTAPP_FILE] == "hostapp"


@pytest.mark.parametrize("scenario,spec", [("data-partuuid-elsewhere", "PARTUUID=64617461-01"),
                                           ("data-path-elsewhere", "/dev/vdb1")])
def test_an_explicit_data_partition_is_honoured_on_another_disk(booted, scenario, spec):
    res = booted(scenario)
    reached_init(res)
    said = res.console.mobynit()
    shown = spec if spec.startswith("/dev/") else f"{spec} is /dev/vdb1"
    assert f"data {shown}, on disk vdb as named (the root partition is on vda)" in said, lines(res)
    assert not any(line.startswith("ignoring ") for line in said), lines(res)
    assert files(res)[HOSTAPP_FILE] == "patched by urgent"
    assert boot_record(res)["boot"]["data"] == {"spec": spec, "device": "/dev/vdb1", "fstype": None, "reason": None,
                                                 "ignored": []}


@uses("damaged-data")
def test_a_damaged_data_partition_is_said_at_once_in_one_line(booted, kit):
    image = boot_kit.disk.partition_image(kit.disks.get("damaged-data").path, 2)
    blkid = subprocess.run(["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True)
    assert "TYPE=" not in blkid.stdout  # blkid sees no file system there either
    res = booted("damaged-data")  # mobynit.wait=600: waiting would outlast the machine
    reached_init(res)
    said = res.console.mobynit()
    about = [line for line in said if "data" in line and not line.startswith(("command line", "mobynit "))]
    assert about == ["no partition of disk vda (the root partition's) carries LABEL=resin-data "
                     "(vda2: no ext2/3/4 file system): hostapp only"], lines(res)
    assert not any(line.startswith("waiting up to") for line in said), lines(res)
    assert files(res)[HOSTAPP_FILE] == "hostapp"
    data = boot_record(res)["boot"]["data"]
    assert data["device"] is None and "vda2: no ext2/3/4 file system" in data["reason"]


@uses("data-errors")
def test_errors_on_the_data_partition_cannot_panic_the_kernel(booted, kit):
    image = boot_kit.disk.partition_image(kit.disks.get("data-errors").path, 2)
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    assert any(line.split(":")[1].strip() == "Panic" for line in header.splitlines() if line.startswith("Errors behavior"))
    res = booted("data-errors")
    reached_init(res)
    assert res.console.first("Kernel panic") is None, res.describe()
    # The kernel met the damage, and obeyed errors=remount-ro rather than the superblock's panic.
    assert res.console.first(r"EXT4-fs error \(device vda2\)") is not None, res.describe()
    assert res.console.first(r"EXT4-fs \(vda2\): Remounting filesystem read-only") is not None, res.describe()
    said = res.console.mobynit()
    why = "extension store unreadable (/data/docker/containers: Structure needs cleaning)"
    assert said.count(f"{why}: hostapp only") == 1, lines(res)
    assert files(res)[HOSTAPP_FILE] == "hostapp"
    assert boot_record(res)["disabled_reason"] == f"{why}: hostapp only"


@uses("root-errors")
def test_a_kernel_panic_while_mobynit_runs_reboots(booted):
    """errors=panic on the root partition, and a directory mobynit looks up is
    damaged: the kernel panics in the middle of assembling. /init armed
    kernel.panic at its start (no panic= given), so the machine reboots."""
    res = booted("root-errors")
    assert res.returncode == 0, res.describe()  # rebooted; -no-reboot made QEMU exit
    assert res.console.first(r"Kernel panic - not syncing: EXT4-fs \(device vda1\): panic forced after error") is not None, \
        res.describe()
    assert res.console.first("Rebooting in 10 seconds") is not None, res.describe()
    assert res.console.mark("init-start") is None
    assert not any(line.startswith("handing over") for line in res.console.mobynit())


@uses("bad-numbers")
def test_bad_numbers_are_said_once_with_their_default(booted):
    res = booted("bad-numbers")
    reached_init(res)
    said = res.console.mobynit()
    assert [line for line in said if line.startswith(("mobynit.wait=", "mobynit.max_tries="))] == [
        "mobynit.wait=soon is not a number of seconds from 0 to 3600; using the default, 30 s",
        "mobynit.max_tries=many is not a whole number from 1 to 999; using the default, 3",
    ], lines(res)
    assert boot_record(res)["attempts"]["max_tries"] == 3


@uses("no-marker")
def test_missing_purge_marker(booted):
    res = booted("no-marker")
    reached_init(res)
    said = res.console.mobynit()
    assert "root /dev/vda1, mounted read-only" in said and "data /dev/vda2" in said, lines(res)
    assert any("remove_me_to_reset is missing" in line for line in said), lines(res)
    assert files(res)[HOSTAPP_FILE] == "hostapp"
    assert "/usr/share/tools/hello" not in files(res)


@uses("corrupt")
def test_corrupted_extensions_are_skipped_with_a_reason(booted, kit):
    res = booted("corrupt")
    reached_init(res)
    said = res.console.mobynit()
    ids = kit.disks.device("full").extensions
    # tools' config.v2.json was cut short: its name is unknown, its id is shown.
    tools = [line for line in said if line.startswith(f"extension {ids['tools'][:12]}: skipped: ")]
    assert tools and f"{ids['tools']}/config.v2.json: not valid JSON" in tools[0], lines(res)
    # firmware's image layer lost its diff directory.
    firmware = [line for line in said if line.startswith("extension firmware: skipped: ")]
    assert firmware and firmware[0].endswith("/diff: missing"), lines(res)
    seen = files(res)
    assert "/usr/share/tools/hello" not in seen and "/usr/share/firmware/blob" not in seen
    assert seen[HOSTAPP_FILE] == "patched by urgent"  # the healthy ones are still there
    assert "root mounted read-only at /newroot: hostapp and 3 extensions" in said
    assert "Traceback" not in res.console.text()


# --- a hostapp that cannot boot ---------------------------------------------------


@uses("broken")
def test_broken_hostapp_panics_for_the_bootloader(booted):
    res = booted("broken")
    assert res.returncode == 0, res.describe()  # the panic rebooted; -no-reboot made QEMU exit
    assert res.console.mark("init-start") is None
    said = res.console.mobynit()
    cannot = [line for line in said if line.startswith("cannot boot: ")]
    assert len(cannot) == 1 and "0000000000" in cannot[0], lines(res)
    assert "no rescue shell (add mobynit.shell); panicking so the bootloader can fall back" in said
    assert res.console.first("Kernel panic - not syncing") is not None
    assert "Traceback" not in res.console.text()


@uses("no-root")
def test_missing_root_partition_is_one_line_then_panic(booted):
    res = booted("no-root")
    said = res.console.mobynit()
    cannot = [line for line in said if line.startswith("cannot boot: ")]
    # The line says how long it really waited: mobynit.wait=1, more on a loaded host (the guest's clock).
    prefix = "cannot boot: root partition LABEL=nowhere did not appear within "
    assert len(cannot) == 1 and cannot[0].startswith(prefix) and cannot[0].endswith(" s"), lines(res)
    assert 1.0 <= float(cannot[0][len(prefix):-2]) < 5.0, lines(res)
    assert res.console.first("Kernel panic - not syncing") is not None, res.describe()
    assert res.console.first("Rebooting in 1 seconds") is not None  # panic=1 from the command line is kept
    assert res.returncode == 0


@uses("no-init")
def test_missing_init_is_a_hostapp_failure(booted):
    res = booted("no-init")
    cannot = [line for line in res.console.mobynit() if line.startswith("cannot boot: ")]
    assert cannot == ["cannot boot: the hostapp has no /sbin/nothing to hand over to"], lines(res)
    assert res.console.first("Kernel panic - not syncing") is not None, res.describe()


@uses("broken-shell")
def test_broken_hostapp_rescue_shell(booted):
    res = booted("broken-shell")
    assert res.returncode == 0, res.describe()
    assert any(line.startswith("cannot boot: ") for line in res.console.mobynit())
    assert res.console.first(r"^RESCUE-42") is not None, res.describe()
    assert res.console.first(r"^ROOT-MOUNTED") is not None  # the root partition is there to repair
    assert res.console.first("Kernel panic") is None


# --- a real distribution -----------------------------------------------------------


@uses("debian")
def test_debian_systemd_hostapp_reaches_its_target(booted):
    res = booted("debian")
    assert res.returncode == 0 and res.console.mark("done") is not None, res.describe()
    assert res.console.mark("target") == "active"
    assert res.console.mark("virt") == "none"  # no .dockerenv: systemd knows it is not in a container
    assert res.console.mark("dockerenv") == "no"
    assert res.console.mark("root").startswith("overlay ro,")
    record = boot_record(res)
    assert record is not None and record["hostapp"]["name"] == "debian"
    assert files(res)["/usr/share/debian-ext/hello"] == "hello from a Debian extension"
    assert res.console.first(r"Reached target .*Multi-User System") is not None
    # `mobynit status`, run inside the booted system, reads the record it was left.
    status = res.console.marks("status")
    assert status[0] == "root partition: LABEL=resin-rootA (/dev/vda1), at /mnt/sysroot/active", res.describe()
    assert any(line.startswith("hostapp debian (") for line in status), status
    assert "extension debian-ext: included, normal" in status


# --- the runner -----------------------------------------------------------------------


def test_runner_kills_and_reaps_at_the_hard_timeout(kit):
    # A root that never appears: the guest would wait 60 s; the runner gives it 6.
    machine = boot_kit.runner.Machine(kit.kernel.vmlinuz, kit.initrd,
                                      "console=ttyS0 root=LABEL=nowhere mobynit.wait=600", timeout=120)
    with boot_kit.runner.Run(machine, boot_kit.LOGS / "runner-timeout.log", "runner-timeout") as run:
        assert run.expect("mobynit: waiting up to 600 s for root partition LABEL=nowhere", 120), run.console.text()[-3000:]
        res = run.result(run.wait(timeout=1))
        assert res.timed_out
        assert run.proc.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(run.proc.pid, 0)  # nothing of its process group is left
