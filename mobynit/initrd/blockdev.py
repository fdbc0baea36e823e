"""Finding the root and data partitions in an initramfs that has no udev.

A device is named the way the kernel command line names it: `LABEL=`,
`UUID=` (read from the ext2/3/4 superblock), `PARTUUID=` (read from the
MBR or GPT partition table), `PARTLABEL=` (the GPT name the kernel reports)
or a `/dev/...` path. This module reads what the kernel shows (a
Snapshot of /sys/class/block, superblocks, partition tables) and sleeps on
the kernel's uevents (a NETLINK_KOBJECT_UEVENT socket); which partition
boot may trust is decided in mobynit.initrd.partitions.
"""

from __future__ import annotations

import posix
import struct
import time

from mobynit.core.fileio import exists, realpath
from mobynit.core.model import Record
from mobynit.core.paths import basename, dirname, join

SYS_BLOCK = "/sys/class/block"
NETLINK_KOBJECT_UEVENT = 15  # <linux/netlink.h>; Python's socket module lacks the name
_EXT_MAGIC = 0xEF53
_KEYS = ("LABEL", "UUID", "PARTUUID", "PARTLABEL")


class DeviceSpec:
    """A parsed `root=`-style device name."""

    __slots__ = ("text", "key", "value")

    def __init__(self, text: str) -> None:
        self.text = text
        key, sep, value = text.partition("=")
        if sep and key.upper() in _KEYS and value:
            self.key, self.value = key.upper(), value
        elif text.startswith("/dev/") and len(text) > 5:
            self.key, self.value = "PATH", text
        else:
            raise ValueError(
                f"device {text!r} is not LABEL=, UUID=, PARTUUID=, PARTLABEL= or a /dev/ path"
            )

    def __str__(self) -> str:
        return self.text


def find(spec: DeviceSpec, sys_block: str = SYS_BLOCK, dev: str = "/dev") -> str | None:
    """The /dev path of the first device `spec` names, if one is there now.

    For tools; boot decides with mobynit.initrd.partitions, which never takes
    the first of several.
    """
    matches = Snapshot(sys_block, dev).matches(spec)
    return matches[0].path if matches else None


class Part(Record):
    """One block device as /sys/class/block shows it: a partition with the
    disk that holds it, or a whole disk (its own `disk`, no `number`)."""

    __slots__ = ("name", "path", "disk", "number", "partname")
    name: str  # the kernel's name: vda1, sda1, nvme0n1p4, mmcblk0p6
    path: str  # its /dev node
    disk: str  # the kernel's name of the disk that holds it
    number: int | None  # PARTN, None for a whole disk
    partname: str | None  # the GPT name, when the kernel reports one

    def where(self) -> str:
        """`/dev/sda1 on disk sda`, for console lines."""
        return f"{self.path} on disk {self.disk}"


class Snapshot:
    """The block devices the kernel shows at one moment, each superblock and
    partition table read at most once: every decision about which partition
    to trust is made on one consistent view."""

    def __init__(self, sys_block: str = SYS_BLOCK, dev: str = "/dev") -> None:
        self.sys_block = sys_block
        self.dev = dev
        self._ext: dict[str, tuple[str, str] | None] = {}
        self._tables: dict[str, frozenset[int] | None] = {}
        self.parts = self._scan()

    def _scan(self) -> tuple[Part, ...]:
        try:
            names = sorted(posix.listdir(self.sys_block))
        except OSError:
            return ()
        parts = []
        for name in names:
            try:
                real = realpath(join(self.sys_block, name))
            except OSError:
                continue  # gone since it was listed (unplugged, its partitions made anew): not there
            props = uevent_props(join(real, "uevent"))
            number = props.get("PARTN")
            if number is not None and number.isdigit():
                # A partition's sysfs directory sits inside its disk's.
                disk = basename(dirname(real))
                parts.append(Part(name, join(self.dev, name), disk, int(number), props.get("PARTNAME")))
            else:
                parts.append(Part(name, join(self.dev, name), name, None, None))
        return tuple(parts)

    def ext(self, part: Part) -> tuple[str, str] | None:
        """(label, uuid) of its ext2/3/4 file system, None for anything else."""
        if part.name not in self._ext:
            self._ext[part.name] = ext_identity(part.path)
        return self._ext[part.name]

    def partuuid(self, part: Part) -> str | None:
        if part.number is None:
            return None
        return partition_uuid(join(self.dev, part.disk), part.number, _sector_size(self.sys_block, part.disk))

    def matches(self, spec: DeviceSpec) -> list[Part]:
        """Every device `spec` names now, in /sys/class/block order."""
        if spec.key == "PATH":
            found = self.by_path(spec.value)
            return [] if found is None else [found]
        return [p for p in self.parts if exists(p.path) and self._matches(spec, p)]

    def _matches(self, spec: DeviceSpec, part: Part) -> bool:
        if spec.key in ("LABEL", "UUID"):
            ident = self.ext(part)
            if ident is None:
                return False
            label, uuid = ident
            return label == spec.value if spec.key == "LABEL" else uuid == spec.value.lower()
        if part.number is None:
            return False
        if spec.key == "PARTLABEL":
            return part.partname == spec.value
        uuid = self.partuuid(part)
        return uuid is not None and uuid == spec.value.lower()

    def by_path(self, path: str) -> Part | None:
        """The device a /dev path names (devtmpfs names nodes as the kernel
        names devices; a symlink is followed), with the path as given."""
        local = join(self.dev, path[5:]) if path.startswith("/dev/") else path
        try:
            name = basename(realpath(local))
        except OSError:
            return None  # no such device (or gone since)
        for part in self.parts:
            if part.name == name:
                return part.replace(path=path)
        return Part(name, path, name, None, None)  # not in sysfs: a disk of its own

    def on_disk(self, disk: str) -> list[Part]:
        """The partitions of `disk` the kernel has made so far."""
        return [p for p in self.parts if p.disk == disk and p.number is not None]

    def missing(self, disk: str) -> list[int]:
        """Partition numbers `disk`'s partition table lists that the kernel
        has not shown yet (partitions appear one after another while the
        table is scanned). Empty when the table cannot be read: the kernel's
        view is then all there is."""
        if disk not in self._tables:
            self._tables[disk] = table_partitions(join(self.dev, disk), _sector_size(self.sys_block, disk))
        listed = self._tables[disk]
        if not listed:
            return []
        shown = {p.number for p in self.on_disk(disk)}
        return sorted(listed - shown)


def uevent_props(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return dict(line.rstrip("\n").partition("=")[::2] for line in f if "=" in line)
    except OSError:
        return {}


def ext_identity(path: str) -> tuple[str, str] | None:
    """(label, uuid) of an ext2/3/4 file system, None for anything else."""
    try:
        with open(path, "rb") as f:
            f.seek(1024)
            sb = f.read(136)
    except OSError:
        return None
    if len(sb) < 136 or struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
        return None
    label = sb[120:136].split(b"\0", 1)[0].decode("utf-8", "replace")
    return label, _uuid_str(sb[104:120])


def _uuid_str(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _guid_str(raw: bytes) -> str:
    """A GPT GUID: the first three fields are little-endian."""
    a, b, c = struct.unpack_from("<IHH", raw)
    tail = raw[8:16].hex()
    return f"{a:08x}-{b:04x}-{c:04x}-{tail[:4]}-{tail[4:]}"


def _sector_size(sys_block: str, disk: str) -> int:
    try:
        with open(join(sys_block, disk, "queue", "logical_block_size"), encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 512


def partition_uuid(disk: str, number: int, sector: int = 512) -> str | None:
    """PARTUUID as the kernel and blkid spell it: `<MBR signature>-<NN>`, or
    the GPT entry's unique GUID."""
    try:
        with open(disk, "rb") as f:
            mbr = f.read(512)
            if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
                return None
            if mbr[446 + 4] != 0xEE:
                signature = struct.unpack_from("<I", mbr, 440)[0]
                return f"{signature:08x}-{number:02x}"
            f.seek(sector)
            header = f.read(92)
            if header[:8] != b"EFI PART":
                return None
            entries_lba, count, size = struct.unpack_from("<QII", header, 72)
            if not 0 < number <= count or size < 32:
                return None
            f.seek(entries_lba * sector + (number - 1) * size)
            entry = f.read(32)
    except OSError:
        return None
    if len(entry) < 32 or entry[16:32] == bytes(16):
        return None
    return _guid_str(entry[16:32])


def is_block_event(msg: bytes) -> bool:
    """Whether a kernel uevent (`action@devpath`, then NUL-terminated KEY=value
    fields) concerns a block device: its SUBSYSTEM field is `block`."""
    return b"\0SUBSYSTEM=block\0" in msg


_MBR_EXTENDED = (0x05, 0x0F, 0x85)  # the types the kernel's msdos parser follows
_MAX_PARTS = 256  # DISK_MAX_PARTS


def table_partitions(disk: str, sector: int = 512) -> frozenset[int] | None:
    """The partition numbers the kernel makes from `disk`'s table (MBR
    primaries and logicals, GPT entries in use), read the way the kernel's
    msdos and efi parsers read them; None when there is no table we know."""
    try:
        with open(disk, "rb") as f:
            mbr = f.read(512)
            if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
                return None
            entries = [struct.unpack_from("<BxxxBxxxII", mbr, 446 + 16 * i) for i in range(4)]
            if any(kind == 0xEE for _, kind, _, _ in entries):
                return _gpt_partitions(f, sector)
            if any(boot not in (0, 0x80) for boot, _, _, _ in entries):
                return None  # the kernel reads this as no partition table (a FAT boot sector, say)
            numbers = {n for n, (_, _, _, size) in enumerate(entries, start=1) if size}
            extended = [start for _, kind, start, size in entries if size and kind in _MBR_EXTENDED]
            if extended:
                numbers.update(_logical_partitions(f, extended[0], sector))
            return frozenset(numbers)
    except OSError:
        return None


def _logical_partitions(f, first: int, sector: int) -> range:
    """Logical partitions (5, 6, ...) along the chain of extended boot records."""
    count = 0
    here = first
    for _ in range(_MAX_PARTS):
        f.seek(here * sector)
        ebr = f.read(512)
        if len(ebr) < 512 or ebr[510:512] != b"\x55\xaa":
            break
        entries = [struct.unpack_from("<4xBxxxII", ebr, 446 + 16 * i) for i in range(4)]
        count += sum(1 for kind, _, size in entries if size and kind not in _MBR_EXTENDED)
        nxt = [start for kind, start, size in entries if size and kind in _MBR_EXTENDED]
        if not nxt:
            break
        here = first + nxt[0]  # links are relative to the first extended partition
    return range(5, 5 + min(count, _MAX_PARTS - 5))


def _gpt_partitions(f, sector: int) -> frozenset[int] | None:
    f.seek(sector)
    header = f.read(92)
    if header[:8] != b"EFI PART":
        return None  # the kernel may still find the backup header: trust its view
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if size < 128 or size > 4096:
        return None
    count = min(count, _MAX_PARTS - 1)
    f.seek(entries_lba * sector)
    raw = f.read(count * size)
    numbers = set()
    for i in range(len(raw) // size):
        entry = raw[i * size : i * size + 56]
        first, last = struct.unpack_from("<QQ", entry, 32)
        if entry[:16] != bytes(16) and first <= last:
            numbers.add(i + 1)
    return frozenset(numbers)


class UeventWaiter:
    """Sleeps until the kernel announces a block device (or the deadline).

    Open it before the second look for a device, so an announcement made
    between that look and the sleep is not lost (see partitions.settle).
    """

    def __init__(self) -> None:
        import socket  # only when a device is late

        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 1))  # group 1: the kernel's own announcements
        self.events = 0

    def wait(self, deadline: float) -> bool:
        """Block until a block-device uevent arrives; False at the deadline."""
        import select

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return False
            msg = self.sock.recv(1 << 16)
            self.events += 1
            if is_block_event(msg):
                return True

    def close(self) -> None:
        self.sock.close()
