"""The boot's parts without booting: device lookup, the console, the
handover path check, the disk builder and the initramfs builder.

What a booted machine shows is in test_boot.py; these pin down the pieces
with known answers from independent tools (sfdisk, mkfs.ext4, debugfs,
cpio, chroot).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from initramfs import build as initramfs
from mobynit.initrd import blockdev
from mobynit.initrd.boot import resolve_in
from mobynit.initrd.console import Console
from qemu import disk

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _sfdisk(image: Path, script: str, size_mib: int = 8) -> None:
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
                   input=script, text=True, check=True, capture_output=True)


def _part_uuid(image: Path, n: int) -> str:
    return subprocess.run(["sfdisk", "--part-uuid", str(image), str(n)],
                          capture_output=True, text=True, check=True).stdout.strip().lower()


# --- device names ---------------------------------------------------------------------


@pytest.mark.parametrize("text,key,value", [
    ("LABEL=resin-rootA", "LABEL", "resin-rootA"),
    ("UUID=6D6F6279-0000-4000-8000-000000000001", "UUID", "6D6F6279-0000-4000-8000-000000000001"),
    ("PARTUUID=12345678-02", "PARTUUID", "12345678-02"),
    ("label=x=y", "LABEL", "x=y"),
    ("PARTLABEL=data", "PARTLABEL", "data"),
    ("/dev/vda2", "PATH", "/dev/vda2"),
])
def test_device_spec_forms(text, key, value):
    spec = blockdev.DeviceSpec(text)
    assert (spec.key, spec.value) == (key, value)


@pytest.mark.parametrize("text", ["", "vda2", "LABEL=", "FOO=bar", "/dev/", "8:2"])
def test_device_spec_rejects_with_a_sentence(text):
    with pytest.raises(ValueError, match="is not LABEL=, UUID=, PARTUUID=, PARTLABEL= or a /dev/ path"):
        blockdev.DeviceSpec(text)


def test_mbr_partuuid_matches_sfdisk(tmp_path):
    image = tmp_path / "mbr.img"
    _sfdisk(image, "label: dos\nlabel-id: 0x1234abcd\nstart=2048, size=4096\nstart=6144, size=4096\n")
    ptuuid = subprocess.run(["blkid", "-p", "-s", "PTUUID", "-o", "value", str(image)],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert ptuuid == "1234abcd"
    assert blockdev.partition_uuid(str(image), 2) == f"{ptuuid}-02"


def test_gpt_partuuid_matches_sfdisk(tmp_path):
    image = tmp_path / "gpt.img"
    _sfdisk(image, "label: gpt\nstart=2048, size=4096\nstart=6144, size=4096\n")
    for n in (1, 2):
        assert blockdev.partition_uuid(str(image), n) == _part_uuid(image, n)
    assert blockdev.partition_uuid(str(image), 3) is None  # an empty entry


def test_no_partition_table(tmp_path):
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(4096))
    assert blockdev.partition_uuid(str(image), 1) is None
    assert blockdev.ext_identity(str(image)) is None


def _fake_machine(tmp_path: Path) -> tuple[str, str]:
    """A /sys/class/block and /dev made of files: disk `vdx` with an ext4
    partition `vdx1` (LABEL resin-data) behind an MBR table."""
    dev, sys_block = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    part = dev / "vdx1"
    disk.make_ext4(part, "resin-data", None, 8, uuid="11111111-2222-4333-8444-555555555555")
    _sfdisk(dev / "vdx", "label: dos\nlabel-id: 0xdeadbeef\nstart=2048, size=16384\n", 16)
    devices = tmp_path / "devices/virtio0/block/vdx"
    (devices / "vdx1").mkdir(parents=True)
    (devices / "uevent").write_text("MAJOR=254\nMINOR=0\nDEVNAME=vdx\nDEVTYPE=disk\n")
    (devices / "vdx1/uevent").write_text("MAJOR=254\nMINOR=1\nDEVNAME=vdx1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=data\n")
    sys_block.mkdir()
    (sys_block / "vdx").symlink_to(devices)
    (sys_block / "vdx1").symlink_to(devices / "vdx1")
    return str(sys_block), str(dev)


@pytest.mark.parametrize("text", [
    "LABEL=resin-data", "UUID=11111111-2222-4333-8444-555555555555", "UUID=11111111-2222-4333-8444-555555555555".upper(),
    "PARTUUID=deadbeef-01", "PARTUUID=DEADBEEF-01", "PARTLABEL=data",
])
def test_find_by_every_name(tmp_path, text):
    sys_block, dev = _fake_machine(tmp_path)
    assert blockdev.find(blockdev.DeviceSpec(text), sys_block, dev) == f"{dev}/vdx1"


@pytest.mark.parametrize("text", ["LABEL=resin-rootA", "UUID=11111111-2222-4333-8444-000000000000",
                                  "PARTUUID=deadbeef-02", "PARTLABEL=boot"])
def test_find_nothing(tmp_path, text):
    sys_block, dev = _fake_machine(tmp_path)
    assert blockdev.find(blockdev.DeviceSpec(text), sys_block, dev) is None


# --- the console ----------------------------------------------------------------------


def _console(tmp_path: Path, level: int) -> tuple[Console, Path, Path, io.StringIO]:
    kmsg, devkmsg, printk = tmp_path / "kmsg", tmp_path / "printk_devkmsg", tmp_path / "printk"
    kmsg.write_text("")
    devkmsg.write_text("ratelimit\n")
    printk.write_text(f"{level}\t4\t1\t7\n")
    out = io.StringIO()
    return Console(str(kmsg), out, devkmsg_sysctl=str(devkmsg), printk_sysctl=str(printk)), kmsg, devkmsg, out


def test_console_line_goes_to_kmsg_and_once_to_the_console(tmp_path):
    # Console log level 7: the kernel echoes info (6) lines itself.
    con, kmsg, devkmsg, out = _console(tmp_path, 7)
    # (a regular file stands in for the sysctl: it keeps what follows the first line)
    assert devkmsg.read_text().splitlines()[0] == "on"  # no rate limit while the boot speaks
    con.info("root LABEL=x is /dev/vda1")
    con.debug("not shown without mobynit.debug")
    assert kmsg.read_text() == "<14>mobynit: root LABEL=x is /dev/vda1\n"
    assert out.getvalue() == ""
    con.close()
    assert devkmsg.read_text().splitlines()[0] == "ratelimit"  # given back before the handover


def test_quiet_console_gets_the_line_directly(tmp_path):
    # `quiet`: console log level 4, the kernel would not echo info lines.
    con, kmsg, _, out = _console(tmp_path, 4)
    con.verbose = True
    con.info("a\nb")
    con.debug("detail")
    assert kmsg.read_text() == "<14>mobynit: a b\n<15>mobynit: detail\n"
    assert out.getvalue() == "mobynit: a b\nmobynit: detail\n"
    con.close()


# --- the handover path --------------------------------------------------------------


def test_resolve_in_follows_symlinks_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd").write_text("")
    (root / "usr/sbin").mkdir()
    (root / "sbin").symlink_to("usr/sbin")  # merged /usr, relative
    (root / "usr/sbin/init").symlink_to("/usr/lib/systemd/systemd")  # absolute: inside the root
    (root / "bin").symlink_to("/bin")  # a loop when read inside the root
    (root / "etc").mkdir()
    assert resolve_in(str(root), "/sbin/init") == f"{root}/usr/lib/systemd/systemd"
    # `..` after a symlink leaves its target, as the kernel does.
    assert resolve_in(str(root), "/sbin/../lib/systemd/systemd") == f"{root}/usr/lib/systemd/systemd"
    assert resolve_in(str(root), "/sbin/../etc") is None
    assert resolve_in(str(root), "/bin/sh") is None
    assert resolve_in(str(root), "/sbin/nothing") is None


# --- the disk --------------------------------------------------------------------------


@needs_root
def test_mkfs_keeps_whiteouts_opaque_dirs_and_symlinks(tmp_path):
    tree = tmp_path / "tree"
    (tree / "opaque").mkdir(parents=True)
    os.mknod(tree / "gone", 0o644 | 0o020000, os.makedev(0, 0))
    os.setxattr(tree / "opaque", "trusted.overlay.opaque", b"y")
    (tree / "link").symlink_to("l/ABCDEF")
    image = tmp_path / "p.img"
    disk.make_ext4(image, "resin-data", tree, uuid=disk.DATA_UUID)
    stat = disk.debugfs(image, "stat /gone")
    assert "Type: character special" in stat and "Device major/minor number: 00:00" in stat
    assert 'trusted.overlay.opaque (1) = "y"' in disk.debugfs(image, "ea_list /opaque")
    assert 'Fast link dest: "l/ABCDEF"' in disk.debugfs(image, "stat /link")
    assert blockdev.ext_identity(str(image)) == ("resin-data", disk.DATA_UUID)


@needs_root
def test_disk_layout(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "root/current").symlink_to("hostapps/x")
    d = disk.device_disk(tmp_path / "disk.img", tmp_path / "root", tmp_path / "data")
    table = subprocess.run(["sfdisk", "--dump", str(d.path)], capture_output=True, text=True, check=True).stdout
    assert "label: dos" in table and f"label-id: 0x{d.signature:08x}" in table
    assert d.partuuid(1) == "6d6f6279-01"
    root = disk.partition_image(d.path, 1)
    assert blockdev.ext_identity(str(root)) == (disk.ROOT_LABEL, disk.ROOT_UUID)
    assert 'Fast link dest: "hostapps/x"' in disk.debugfs(root, "stat /current")
    assert blockdev.ext_identity(str(disk.partition_image(d.path, 2)))[0] == disk.DATA_LABEL


# --- the initramfs ----------------------------------------------------------------------


def test_boot_closure_is_lean():
    closure = initramfs.boot_closure()
    assert {"mobynit.initrd.boot", "mobynit.core.assemble", "mobynit.initrd.blockdev", "mobynit.initrd.console", "socket", "json"} <= closure
    # What the boot path must never pull in (cost, or a dependency off the boot path).
    assert not closure & {"attrs", "argparse", "logging", "typing", "pyroute2", "mobynit.tools.cli", "mobynit.runtime.manager"}


@pytest.fixture(scope="module")
def kernel_modules():
    from tests.boot.kit import CACHE
    from qemu import kernel

    return kernel.fetch(CACHE / "kernel").modules


@needs_root
def test_module_order_loads_dependencies_first(kernel_modules):
    order = [Path(p).name for p in initramfs.module_order(kernel_modules)]
    assert order.index("virtio.ko") < order.index("virtio_pci.ko")
    assert order.index("virtio_ring.ko") < order.index("virtio_blk.ko")
    assert "overlay.ko" in order and "ext4.ko" not in order  # ext4 is built in


@needs_root
def test_initramfs_runs_the_boot_imports_in_a_chroot(kernel_modules, tmp_path):
    out = tmp_path / "initrd.gz"
    summary = initramfs.build(kernel_modules, out)
    assert summary["gzip_bytes"] == out.stat().st_size < 10_000_000
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(f"gzip -dc {out} | cpio -idm --quiet", shell=True, cwd=root, check=True)
    for path in ("init", "bin/busybox", "bin/sh", "sbin/switch_root", "usr/bin/python3", "dev/console",
                 "usr/lib/python3.11/mobynit/initrd/boot.py", "usr/lib/python3.11/os.pyc", "lib/modules/load-order"):
        assert os.path.lexists(root / path), path
    assert not list(root.rglob("attrs")) and not list(root.rglob("_ssl*"))
    # The interpreter as packed starts, and everything the boot path can reach imports.
    reach = sorted(initramfs.boot_closure() - {"__future__"})
    script = f"import sys\nfor m in {reach!r}: __import__(m)\nimport hashlib\nprint(hashlib.sha256(b'').hexdigest()[:8])"
    res = subprocess.run(["/usr/sbin/chroot", str(root), "/usr/bin/python3", "-S", "-B", "-c", script],
                         env={"PYTHONHASHSEED": "0"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "e3b0c442"
    load = (root / "lib/modules/load-order").read_text().split()
    assert load == [Path(p).name for p in initramfs.module_order(kernel_modules)]
    # Reproducible: the same inputs give the same bytes.
    again = tmp_path / "again.gz"
    initramfs.build(kernel_modules, again)
    assert again.read_bytes() == out.read_bytes()


# --- mobynit status ------------------------------------------------------------------


def _status(*args: str) -> subprocess.CompletedProcess:
    import sys

    from tests.boot.kit import REPO

    return subprocess.run([sys.executable, "-m", "mobynit", "status", *args], capture_output=True, text=True, cwd=REPO)


def _record(**changes: object) -> dict:
    """A whole boot record, as boot writes it (docs/plan-json.md), with extensions switched off."""
    record = {
        "version": 1,
        "hostapp": {"id": "ab" * 32, "name": "hostapp", "layers": ["/sysroot/balena/overlay2/x/diff"]},
        "extensions": [], "disabled_by": "balena.nohostext",
        "disabled_reason": "extensions disabled by balena.nohostext on the kernel command line",
        "kernel_release": "6.1.0", "page_size": 4096, "target": "/newroot", "layout": "flat", "layout_reason": None,
        "mechanism": "mount", "stacking_depth": 1, "mounts": [], "fallbacks": [], "timings_ms": {"read": 0.5},
        "attempts": None,
        "boot": {"root": {"spec": "LABEL=resin-rootA", "device": "/dev/vda1", "fstype": "ext4", "reason": None,
                          "ignored": ["/dev/sda1"]},
                 "data": {"spec": "LABEL=resin-data", "device": None, "fstype": None,
                          "reason": "extensions disabled by balena.nohostext", "ignored": []},
                 "init": "/sbin/init", "init_start": 1.5, "modules_loaded": 1.75, "python_start": 2.0,
                 "python_ready": 2.1, "cmdline": "root=LABEL=resin-rootA balena.nohostext", "handover": 2.25,
                 "phases": {"wait_root": 0.01, "assemble": 0.04}},
    }
    record.update(changes)
    return record


def test_status_of_a_boot_with_extensions_switched_off(tmp_path):
    record = _record()
    path = tmp_path / "boot.json"
    path.write_text(json.dumps(record))
    out = _status("--record", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "root partition: LABEL=resin-rootA (/dev/vda1), at /mnt/sysroot/active",
        "  ignored /dev/sda1: named like it, not on its disk",
        "data partition: LABEL=resin-data (not mounted: extensions disabled by balena.nohostext)",
        "hostapp hostapp (abababababab): 1 layers",
        "extensions disabled by balena.nohostext on the kernel command line",
        "init: /sbin/init, handed over at 2.25 s (0.75 s in the initramfs)",
        "phases: wait_root 10 ms, assemble 40 ms",
        "live: nothing merged since boot",  # boot-time and live extensions together
    ]
    shown = json.loads(_status("--record", str(path), "--json").stdout)
    assert shown.pop("live") is None  # nothing merged live: only the boot record
    assert shown == record


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not a mobynit boot record: the record is not an object"),
    (json.dumps(_record(version=2)), "not a mobynit boot record: version 2, this mobynit reads version 1"),
    (json.dumps(_record(extensions=[{"id": "x"}])), "not a mobynit boot record: extensions[0].name is missing"),
    (json.dumps(_record(page_size="4096")), "not a mobynit boot record: page_size has the wrong type (str)"),
    (json.dumps(_record(fallbacks=[True])), "not a mobynit boot record: fallbacks[0] has the wrong type (bool)"),
])
def test_status_of_a_bad_record_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "boot.json"
    path.write_text(content)
    out = _status("--record", str(path))
    assert out.returncode == 1 and message in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr
