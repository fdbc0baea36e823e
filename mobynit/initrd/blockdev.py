"""Finding the root and data partitions in an initramfs that has no udev.

A device is named the way the kernel command line names it: `LABEL=`,
`UUID=` (read from the ext2/3/4 superblock), `PARTUUID=` (read from the
MBR or GPT partition table), `PARTLABEL=` (the GPT name the kernel reports)
or a `/dev/...` path. Devices show up asynchronously while drivers probe;
waiting is driven by the kernel's uevents (a NETLINK_KOBJECT_UEVENT socket),
opened only when the device is not there yet, so the common boot never pays
for it and a slow disk is picked up the moment the kernel announces it.
"""

from __future__ import annotations

import os
import struct
import time

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
    """The /dev path of the device `spec` names, if it is there now."""
    if spec.key == "PATH":
        return spec.value if os.path.exists(spec.value) else None
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return None
    for name in names:
        path = os.path.join(dev, name)
        if os.path.exists(path) and _matches(spec, name, path, sys_block, dev):
            return path
    return None


def _matches(spec: DeviceSpec, name: str, path: str, sys_block: str, dev: str) -> bool:
    if spec.key in ("LABEL", "UUID"):
        ident = ext_identity(path)
        if ident is None:
            return False
        label, uuid = ident
        return label == spec.value if spec.key == "LABEL" else uuid == spec.value.lower()
    props = uevent_props(os.path.join(sys_block, name, "uevent"))
    if "PARTN" not in props:
        return False
    if spec.key == "PARTLABEL":
        return props.get("PARTNAME") == spec.value
    disk = os.path.basename(os.path.dirname(os.path.realpath(os.path.join(sys_block, name))))
    uuid = partition_uuid(os.path.join(dev, disk), int(props["PARTN"]), _sector_size(sys_block, disk))
    return uuid is not None and uuid == spec.value.lower()


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
        with open(os.path.join(sys_block, disk, "queue", "logical_block_size"), encoding="ascii") as f:
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


class UeventWaiter:
    """Sleeps until the kernel announces a block device (or the deadline).

    Open it before the second look for a device, so an announcement made
    between that look and the sleep is not lost.
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


def wait_for(spec: DeviceSpec, timeout: float, log=None) -> tuple[str | None, float]:
    """Find `spec`, waiting up to `timeout` seconds for it to appear.

    Returns (path or None, seconds waited).
    """
    start = time.monotonic()
    path = find(spec)
    if path is not None:
        return path, 0.0
    try:
        waiter = UeventWaiter()
    except OSError as e:
        if log is not None:
            log(f"cannot listen for kernel uevents ({e.strerror}): not waiting for {spec}")
        return find(spec), time.monotonic() - start
    try:
        if log is not None:
            log(f"waiting up to {timeout:g} s for {spec}")
        deadline = start + timeout
        while True:
            path = find(spec)
            if path is not None or not waiter.wait(deadline):
                break
        if path is None:
            path = find(spec)  # a last look: the deadline may have cut a wake-up short
    finally:
        waiter.close()
    return path, time.monotonic() - start
