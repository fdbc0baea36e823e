"""Which partitions boot trusts (mobynit.initrd.partitions), on synthetic
/sys/class/block trees shaped as the kernel lays them out for virtio, USB,
SATA, NVMe and MMC disks, with /dev nodes that are real images: partition
tables written by sfdisk, file systems by mkfs.ext4. The answers are checked
against the tree as built and against blkid and sfdisk, not against mobynit.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mobynit.initrd import partitions
from mobynit.initrd.blockdev import DeviceSpec, Snapshot, table_partitions
from mobynit.initrd.partitions import choose_data, choose_root

# Where each kind of disk sits under /sys/devices, as the kernel shows it.
PARENTS = {
    "vd": "pci0000:00/0000:00:04.0/virtio1",
    "sd": "pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host0/target0:0:0/0:0:0:0",
    "nvme": "pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0",
    "mmcblk": "platform/soc/fe340000.mmc/mmc_host/mmc0/mmc0:0001",
}
ROOT_UUID = "6d6f6279-0000-4000-8000-000000000001"
DATA_UUID = "6d6f6279-0000-4000-8000-000000000002"
ROGUE_UUID = "6d6f6279-0000-4000-8000-0000000000ff"


def _run(*cmd: str, input: str | None = None) -> str:
    return subprocess.run(cmd, input=input, capture_output=True, text=True, check=True).stdout


def _blkid(path: str, tag: str) -> str:
    res = subprocess.run(["blkid", "-p", "-s", tag, "-o", "value", path], capture_output=True, text=True)
    return res.stdout.strip()


@dataclass(frozen=True)
class P:
    """A partition to make: its file system label (None: no file system)."""

    label: str | None
    uuid: str | None = None


class Machine:
    """/sys/class/block and /dev made of directories and image files."""

    def __init__(self, tmp: Path) -> None:
        self.dev = tmp / "dev"
        self.sys_block = tmp / "sys/class/block"
        self.devices = tmp / "sys/devices"
        self.dev.mkdir()
        self.sys_block.mkdir(parents=True)
        self.signatures = iter(range(0x6D6F0001, 0x6D6F0100))

    def disk(self, name: str, parts: list[P | None], *, label: str = "dos", removable: bool = False,
             shown: int | None = None, partnames: dict[int, str] | None = None) -> int:
        """Disk `name` with a table of `parts` (None: an unused slot); the kernel
        has made the first `shown` of them (all by default). Returns the MBR signature."""
        sep = "p" if name[-1].isdigit() else ""
        kind = next(k for k in PARENTS if name.startswith(k))
        sysdir = self.devices / PARENTS[kind] / "block" / name
        (sysdir / "queue").mkdir(parents=True)
        (sysdir / "queue/logical_block_size").write_text("512\n")
        (sysdir / "removable").write_text("1\n" if removable else "0\n")
        (sysdir / "uevent").write_text(f"MAJOR=8\nMINOR=0\nDEVNAME={name}\nDEVTYPE=disk\n")
        (self.sys_block / name).symlink_to(sysdir)
        signature = next(self.signatures)
        script = [f"label: {label}"] + ([f"label-id: 0x{signature:08x}"] if label == "dos" else []) + [""]
        start = 2048
        for p in parts:
            script.append(f"start={start}, size=2048" if p is not None else "size=0")
            start += 2048
        if label == "dos":
            script = [line for line in script if line != "size=0"]
        _run("truncate", "-s", "8M", str(self.dev / name))
        _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(self.dev / name), input="\n".join(script) + "\n")
        numbered = [(n, p) for n, p in enumerate(parts, start=1) if p is not None]
        for n, p in numbered[: len(numbered) if shown is None else shown]:
            pname = f"{name}{sep}{n}"
            (sysdir / pname).mkdir()
            (sysdir / pname / "partition").write_text(f"{n}\n")
            extra = f"PARTNAME={partnames[n]}\n" if partnames and n in partnames else ""
            (sysdir / pname / "uevent").write_text(f"MAJOR=8\nMINOR={n}\nDEVNAME={pname}\nDEVTYPE=partition\nPARTN={n}\n{extra}")
            (self.sys_block / pname).symlink_to(sysdir / pname)
            image = self.dev / pname
            _run("truncate", "-s", "1M", str(image))
            if p.label is not None:
                cmd = ["mkfs.ext4", "-q", "-F", "-L", p.label]
                _run(*cmd, *(["-U", p.uuid] if p.uuid else []), str(image))
        return signature

    def superfloppy(self, name: str, label: str) -> None:
        """A whole disk formatted without a partition table (a USB stick)."""
        sysdir = self.devices / PARENTS["sd"] / "block" / name
        sysdir.mkdir(parents=True)
        (sysdir / "removable").write_text("1\n")
        (sysdir / "uevent").write_text(f"MAJOR=8\nMINOR=16\nDEVNAME={name}\nDEVTYPE=disk\n")
        (self.sys_block / name).symlink_to(sysdir)
        _run("truncate", "-s", "1M", str(self.dev / name))
        _run("mkfs.ext4", "-q", "-F", "-L", label, str(self.dev / name))

    def snap(self) -> Snapshot:
        return Snapshot(str(self.sys_block), str(self.dev))

    def part(self, name: str):
        return next(p for p in self.snap().parts if p.name == name)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


DEVICE = [P("resin-boot"), P("resin-rootA", ROOT_UUID), P("resin-rootB"), P("resin-data", DATA_UUID)]
ROGUE = [P("resin-data", ROGUE_UUID)]

# (the device's disk, the stick's or card's disk): every pair where the
# rogue's name sorts first, and some where it sorts last.
PAIRS = [("vda", "sda"), ("nvme0n1", "sda"), ("mmcblk0", "sda"), ("sda", "sdb"), ("vdb", "vda"),
         ("nvme0n1", "mmcblk1"), ("mmcblk1", "mmcblk0"), ("sdb", "nvme0n1")]


def _sep(disk: str) -> str:
    return "p" if disk[-1].isdigit() else ""


@pytest.mark.parametrize("own,rogue", PAIRS)
def test_data_by_label_comes_from_the_root_partitions_disk(machine, own, rogue):
    machine.disk(own, DEVICE)
    machine.disk(rogue, ROGUE, removable=rogue.startswith(("sd", "mmcblk1")))
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False)
    assert root is not None and root.part.name == f"{own}{_sep(own)}2" and root.ignored == ()
    choice = choose_data(snap, DeviceSpec("LABEL=resin-data"), root.part, False)
    assert choice is not None and choice.part is not None
    assert choice.part.name == f"{own}{_sep(own)}4"
    assert _blkid(choice.part.path, "UUID") == DATA_UUID  # the device's own, by blkid
    # The stick's partition is named, never used.
    assert [p.name for p in choice.ignored] == [f"{rogue}{_sep(rogue)}1"]
    assert _blkid(choice.ignored[0].path, "UUID") == ROGUE_UUID


def test_a_partitionless_stick_is_no_data_partition(machine):
    machine.disk("mmcblk0", DEVICE)
    machine.superfloppy("sda", "resin-data")
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    choice = choose_data(snap, DeviceSpec("LABEL=resin-data"), root, False)
    assert choice.part.name == "mmcblk0p4"
    assert [p.name for p in choice.ignored] == ["sda"] and _blkid(f"{machine.dev}/sda", "LABEL") == "resin-data"


def test_an_ambiguous_root_is_refused_with_its_candidates(machine):
    machine.disk("mmcblk0", DEVICE)
    machine.disk("sda", [P("resin-rootA"), P("resin-data")], removable=True)
    choice = choose_root(machine.snap(), DeviceSpec("LABEL=resin-rootA"), None, False)
    assert choice.part is None
    assert choice.why == ("root partition LABEL=resin-rootA is ambiguous: "
                          f"{machine.dev}/mmcblk0p2 on disk mmcblk0, {machine.dev}/sda1 on disk sda; not guessing "
                          "(name it by PARTUUID= or UUID=, or boot through systemd-boot)")


def test_a_root_named_by_partuuid_names_a_planted_twin(machine):
    own = machine.disk("vdb", DEVICE)
    machine.disk("vda", [P("resin-rootA"), P("resin-data")])
    assert _blkid(f"{machine.dev}/vdb", "PTUUID") == f"{own:08x}"
    snap = machine.snap()
    choice = choose_root(snap, DeviceSpec(f"PARTUUID={own:08x}-02"), None, False)
    assert choice.part.name == "vdb2"
    assert [p.name for p in choice.ignored] == ["vda1"]  # carries resin-rootA on another disk


def _loader_var(tmp: Path, partuuid: str) -> str:
    efivars = tmp / "firmware/efi/efivars"
    efivars.mkdir(parents=True)
    var = efivars / partitions.LOADER_PARTUUID
    var.write_bytes(b"\x06\x00\x00\x00" + (partuuid.upper() + "\0").encode("utf-16-le"))
    return str(efivars)


@pytest.mark.parametrize("loader_disk", ["nvme0n1", "sda"])
def test_the_boot_loaders_disk_decides_an_ambiguous_root(machine, tmp_path, loader_disk):
    esp = P(None)  # the EFI system partition: vfat in life, no ext file system here
    machine.disk("nvme0n1", [esp, *DEVICE[1:]], label="gpt")
    machine.disk("sda", [esp, P("resin-rootA"), P("resin-data")], label="gpt", removable=True)
    sep = _sep(loader_disk)
    esp_uuid = _run("sfdisk", "--part-uuid", f"{machine.dev}/{loader_disk}", "1").strip().lower()
    hint = partitions.loader_partuuid(_loader_var(tmp_path, esp_uuid))
    assert hint == esp_uuid
    snap = machine.snap()
    choice = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), hint, False)
    assert choice.part.name == f"{loader_disk}{sep}2"
    assert len(choice.ignored) == 1 and choice.ignored[0].disk != loader_disk
    data = choose_data(snap, DeviceSpec("LABEL=resin-data"), choice.part, False)
    assert data.part.disk == loader_disk


def test_a_loader_hint_from_a_disk_not_there_yet_waits(machine):
    machine.disk("sda", [P("resin-rootA"), P("resin-data")], removable=True)
    hint = "01234567-89ab-cdef-0123-456789abcdef"
    assert choose_root(machine.snap(), DeviceSpec("LABEL=resin-rootA"), hint, False) is None  # pending
    final = choose_root(machine.snap(), DeviceSpec("LABEL=resin-rootA"), hint, True)
    assert final.part.name == "sda1"  # at the deadline, the one there is


def test_no_efi_no_hint(tmp_path):
    assert partitions.loader_partuuid(str(tmp_path / "firmware/efi/efivars")) is None


def test_a_zeroed_data_partition_is_named_at_once(machine):
    machine.disk("vda", [P("resin-rootA"), P(None)])
    assert _blkid(f"{machine.dev}/vda2", "TYPE") == ""  # blkid sees no file system either
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    choice = choose_data(snap, DeviceSpec("LABEL=resin-data"), root, False)
    assert choice is not None and choice.part is None  # decided, not pending
    assert choice.why == "no partition of disk vda (the root partition's) carries LABEL=resin-data (vda2: no ext2/3/4 file system)"


def test_a_partition_still_to_come_is_waited_for(machine):
    machine.disk("mmcblk0", DEVICE, shown=2)  # the kernel has made p1 and p2 so far
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    assert snap.missing("mmcblk0") == [3, 4]
    assert choose_data(snap, DeviceSpec("LABEL=resin-data"), root, False) is None
    final = choose_data(snap, DeviceSpec("LABEL=resin-data"), root, True)
    assert final.why.endswith("its partition table lists partition 3, 4, which never appeared")


@pytest.mark.parametrize("form", ["UUID", "PARTUUID", "PATH"])
def test_an_explicit_data_partition_is_honoured_on_another_disk(machine, form):
    machine.disk("vda", [P("resin-rootA"), P("resin-data", DATA_UUID)])
    stick = machine.disk("sda", ROGUE, removable=True)
    text = {"UUID": f"UUID={ROGUE_UUID}", "PARTUUID": f"PARTUUID={stick:08x}-01", "PATH": "/dev/sda1"}[form]
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    choice = choose_data(snap, DeviceSpec(text), root, False)
    assert choice.part is not None and choice.part.disk == "sda"
    assert _blkid(f"{machine.dev}/{choice.part.name}", "UUID") == ROGUE_UUID


def test_an_explicit_name_not_there_yet_is_waited_for(machine):
    machine.disk("vda", [P("resin-rootA")])
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    assert choose_data(snap, DeviceSpec(f"UUID={DATA_UUID}"), root, False) is None  # may be on a late disk


def test_two_data_partitions_on_the_roots_disk_are_refused(machine):
    machine.disk("vda", [P("resin-rootA"), P("resin-data"), P("resin-data")])
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    choice = choose_data(snap, DeviceSpec("LABEL=resin-data"), root, False)
    assert choice.part is None and choice.why.startswith("data partition LABEL=resin-data is ambiguous on disk vda: ")


def test_partlabel_is_a_label_too(machine):
    machine.disk("vda", [P("resin-rootA"), P(None)], label="gpt", partnames={2: "resin-data"})
    machine.disk("sda", [P(None)], label="gpt", partnames={1: "resin-data"}, removable=True)
    snap = machine.snap()
    root = choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, False).part
    choice = choose_data(snap, DeviceSpec("PARTLABEL=resin-data"), root, False)
    assert choice.part.name == "vda2" and [p.name for p in choice.ignored] == ["sda1"]


# --- the partition table, against sfdisk -----------------------------------------------


def _sfdisk_numbers(image: Path) -> set[int]:
    table = json.loads(_run("sfdisk", "--json", str(image)))["partitiontable"]
    return {int(p["node"][len(str(image)):]) for p in table.get("partitions", [])}


@pytest.mark.parametrize("script", [
    "label: dos\nstart=2048, size=2048\nstart=4096, size=2048\n",
    "label: dos\n{img}1 : start=2048, size=2048\n{img}3 : start=6144, size=2048\n",  # an unused slot: 1 and 3
    # logical partitions inside an extended one: 1, 2 (extended), 5, 6, 7
    "label: dos\nstart=2048, size=2048\nstart=4096, size=12288, type=5\nstart=6144, size=2048\n"
    "start=10240, size=2048\nstart=14336, size=1024\n",
    "label: gpt\nstart=2048, size=2048\nstart=4096, size=2048\nstart=6144, size=2048\n",
])
def test_table_partitions_match_sfdisk(tmp_path, script):
    image = tmp_path / "disk.img"
    _run("truncate", "-s", "16M", str(image))
    _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image), input=script.format(img=image))
    assert table_partitions(str(image)) == _sfdisk_numbers(image)


def test_no_table(tmp_path):
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(8192))
    assert table_partitions(str(image)) is None


# --- waiting -----------------------------------------------------------------------------


def test_settle_gives_up_at_the_deadline_with_one_line(machine):
    said: list[str] = []
    choice, waited = partitions.settle(lambda snap, final: None, 0.2, "data partition UUID=x", said.append,
                                       str(machine.sys_block), str(machine.dev))
    assert choice.part is None and choice.why.startswith("data partition UUID=x did not appear within")
    assert waited >= 0.2
    assert said == ["waiting up to 0.2 s for data partition UUID=x"]


def test_settle_decides_at_once_without_listening(machine):
    said: list[str] = []
    machine.disk("vda", [P("resin-rootA")])
    choice, waited = partitions.settle(
        lambda snap, final: choose_root(snap, DeviceSpec("LABEL=resin-rootA"), None, final), 5.0, "root", said.append,
        str(machine.sys_block), str(machine.dev))
    assert choice.part.name == "vda1" and waited == 0.0 and said == []


def test_a_device_gone_between_listing_and_looking_is_not_there(machine):
    """sysfs lists a device whose directory is gone by the time it is looked at (unplugged,
    or its partitions made anew while boot waits): the snapshot leaves it out, and boot goes on."""
    machine.disk("vda", DEVICE)
    (machine.sys_block / "sdz").symlink_to(machine.devices / "gone" / "block" / "sdz")  # dangling, as after removal
    snap = machine.snap()
    names = [p.name for p in snap.parts]
    assert "sdz" not in names and "vda2" in names
    assert snap.by_path("/dev/sdz") is None  # no node and no sysfs entry: no device
    (machine.dev / "vda").rename(machine.dev / "vda.gone")
    assert snap.by_path("/dev/vda") is None
