"""A device's disk: partition images made from the trees the engine wrote.

`mkfs.ext4 -d` turns a directory into a file system without mounting
anything, keeping what overlay2 relies on: symlinks, 0/0 character devices
(whiteouts) and trusted.* xattrs (opaque directories). The partitions go
into one raw disk behind an MBR table, labelled as balenaOS labels them:

    p1  resin-rootA  ext4  the root partition: /balena, /hostapps, /current
    p2  resin-data   ext4  the data partition: /docker, /remove_me_to_reset
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
ROOT_LABEL = "resin-rootA"
DATA_LABEL = "resin-data"
# Fixed file system UUIDs, so a test can name a partition by UUID=.
ROOT_UUID = "6d6f6279-6e69-4174-8000-726f6f744131"
DATA_UUID = "6d6f6279-6e69-4174-8000-646174613031"


class DiskError(RuntimeError):
    pass


@dataclass(frozen=True)
class Partition:
    label: str
    tree: Path | None  # None: an empty file system
    size_mib: int = 0  # 0: fit the tree
    uuid: str | None = None  # None: a random one
    # Damage, for the tests of what boot does with a broken partition:
    errors: str | None = None  # the superblock's error behaviour (tune2fs -e): continue, remount-ro, panic
    broken_dirs: tuple[str, ...] = ()  # directories whose inode gets an invalid extent header
    zero_superblock: bool = False  # no readable file system left


@dataclass(frozen=True)
class Disk:
    path: Path
    signature: int  # MBR disk signature: PARTUUID is "<signature:08x>-<NN>"
    labels: tuple[str, ...]

    def partuuid(self, number: int) -> str:
        return f"{self.signature:08x}-{number:02x}"


def _run(*cmd: str, input: str | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if res.returncode != 0:
        raise DiskError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def tree_mib(tree: Path) -> int:
    """Blocks used by a tree, in MiB, rounded up."""
    out = _run("du", "-s", "--block-size=1M", str(tree))
    return int(out.split()[0])


def make_ext4(image: Path, label: str, tree: Path | None, size_mib: int = 0, uuid: str | None = None) -> int:
    """An ext4 image of `tree`; returns its size in MiB."""
    if not size_mib:
        used = tree_mib(tree) if tree is not None else 0
        size_mib = max(32, int(used * 1.3) + 32)  # room for metadata, journal and inodes
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label, "-I", "256", "-E", "root_owner=0:0"]
    if uuid is not None:
        cmd += ["-U", uuid]
    if tree is not None:
        cmd += ["-d", str(tree)]
    _run(*cmd, str(image))
    return size_mib


def damage(image: Path, part: Partition) -> None:
    """Break a partition image the ways a test asks for. A directory whose
    inode's extent header is zeroed is an ext4 error the moment the kernel
    looks it up (e2fsck reports it too); the superblock's error behaviour then
    decides between going on, remounting read-only and a kernel panic."""
    if part.errors is not None:
        _run("tune2fs", "-e", part.errors, str(image))
    for path in part.broken_dirs:
        _run("debugfs", "-w", "-R", f"sif {path} block[0] 0", str(image))
    if part.zero_superblock:
        with open(image, "r+b") as f:
            f.seek(1024)
            f.write(bytes(1024))


def make_disk(path: Path, partitions: list[Partition], signature: int = 0x6D6F6279) -> Disk:
    """One raw disk holding `partitions`, in order, behind an MBR table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.parent
    images: list[tuple[Path, int]] = []
    for n, part in enumerate(partitions, start=1):
        image = work / f".{path.name}.p{n}"
        images.append((image, make_ext4(image, part.label, part.tree, part.size_mib, part.uuid)))
        damage(image, part)
    total = 1 + sum(size for _, size in images) + 1
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(total * MiB)
    table = [f"label: dos", f"label-id: 0x{signature:08x}", "unit: sectors", ""]
    start = MiB // 512
    for _, size in images:
        table.append(f"start={start}, size={size * MiB // 512}, type=83")
        start += size * MiB // 512
    _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), input="\n".join(table) + "\n")
    offset = 1
    for image, size in images:
        _run("dd", f"if={image}", f"of={path}", "bs=1M", f"seek={offset}", "conv=notrunc,sparse", "status=none")
        offset += size
        image.unlink()
    return Disk(path=path, signature=signature, labels=tuple(p.label for p in partitions))


def device_disk(path: Path, sysroot: Path, data: Path | None, *, index: bool = False) -> Disk:
    """The disk of a device built by harness.device.build_device (no data
    partition when `data` is None). With `index`, the layers' facts are
    recorded first (`mobynit index`, as an image build would), so that boot
    can mount a flat root."""
    if index:
        import os

        from mobynit.core.assemble import index_stores
        from mobynit.core.paths import store_paths

        index_stores(store_paths(str(sysroot), str(data) if data is not None else None), os.uname().release)
    parts = [Partition(ROOT_LABEL, sysroot, uuid=ROOT_UUID)]
    if data is not None:
        parts.append(Partition(DATA_LABEL, data, uuid=DATA_UUID))
    return make_disk(path, parts)


def data_disk(path: Path, data: Path) -> Disk:
    """A disk holding only the data partition (for a second, late disk)."""
    return make_disk(path, [Partition(DATA_LABEL, data, uuid=DATA_UUID)], signature=0x64617461)


def debugfs(image: Path, request: str) -> str:
    """Ask debugfs about an ext4 image (for checking what mkfs.ext4 -d kept)."""
    return _run("debugfs", "-R", request, str(image))


def partition_image(disk: Path, number: int) -> Path:
    """Copy one partition out of a disk (for inspection with debugfs)."""
    out = _run("sfdisk", "--json", str(disk))
    import json

    parts = json.loads(out)["partitiontable"]["partitions"]
    part = parts[number - 1]
    image = disk.with_name(f"{disk.name}.p{number}.img")
    _run("dd", f"if={disk}", f"of={image}", "bs=1M", f"skip={part['start'] * 512}", f"count={part['size'] * 512}",
         "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none")
    os.chmod(image, 0o644)
    return image
