"""sysext images on the data partition join the root at boot (mobynit.core.images, docs/boot.md).

A copy of the standard device gets `data/extensions/` with squashfs and erofs
images made by Debian's squashfs-tools and erofs-utils and a directory image,
good ones and bad ones. The oracles: the source trees the images were made
from, read back through the kernel's mounted root; the kernel's mount table
and loop devices for what is left behind.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import mounts
from tests.harness.device import ABI_ID, KERNEL_RELEASE, MODULE_SYMVERS, copy_device
from tests.runs import assembled, by_name, mobynit, plan, read

pytestmark = pytest.mark.engine

RELEASE_DIR = "usr/lib/extension-release.d"
OK_RELEASE = "ID=balena-os\nVERSION_ID=7.0.0\n"


def tree(root: Path, files: dict[str, str | bytes], name: str, release: str | None = OK_RELEASE) -> Path:
    top = root / name
    for rel, data in files.items():
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    if release is not None:
        p = top / RELEASE_DIR / f"extension-release.{name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(release)
    return top


def squashfs(src: Path, out: Path) -> None:
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"], check=True,
                   capture_output=True)


def erofs(src: Path, out: Path) -> None:
    subprocess.run(["mkfs.erofs", "--quiet", str(out), str(src)], check=True, capture_output=True)


# name -> files; the good ones, each checked file by file through the root
GOOD = {
    "sq-tool": {"usr/share/sq-tool/data": "sq-tool data\n", "usr/share/hostapp/only-in-hostapp": "replaced by sq-tool\n",
                "opt/sq-tool/bin": "opt of sq-tool\n"},
    "ero-tool": {"usr/share/ero-tool/data": "ero-tool data\n"},
    "dir-tool": {"usr/share/dir-tool/data": "dir-tool data\n"},
    "stack-9": {"usr/share/stack/which": "stack-9\n"},
    "stack-10": {"usr/share/stack/which": "stack-10\n"},  # 10 > 9 as versions: on top
    "mods": {"usr/share/mods/data": "mods\n", f"usr/lib/modules/{KERNEL_RELEASE}/Module.symvers": MODULE_SYMVERS},
}


@pytest.fixture(scope="module")
def imaged(device, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("imaged")
    dev = copy_device(device, base / "dev")
    mobynit("index", "--sysroot", str(dev.sysroot), "--data", str(dev.data))
    src = base / "src"
    images = dev.data / "extensions"
    images.mkdir()
    for name, files in GOOD.items():
        top = tree(src, files, name)
        if name == "dir-tool":
            shutil.copytree(top, images / name, symlinks=True)
        elif name == "ero-tool":
            erofs(top, images / f"{name}.raw")
        else:
            squashfs(top, images / f"{name}.raw")
    squashfs(tree(src, {"usr/share/other-os/x": "x\n"}, "other-os", "ID=fedora\nVERSION_ID=40\n"),
             images / "other-os.raw")
    wrong = tree(src, {"usr/share/renamed/x": "x\n"}, "renamed", None)
    (wrong / RELEASE_DIR).mkdir(parents=True)
    (wrong / RELEASE_DIR / "extension-release.somebody-else").write_text(OK_RELEASE)
    squashfs(wrong, images / "renamed.raw")
    squashfs(tree(src, {"usr/share/outside/x": "x\n", "etc/passwd": "root::0:0::/:/bin/sh\n"}, "outside"),
             images / "outside.raw")
    white = tree(src, {"usr/share/white/x": "x\n"}, "white")
    os.mknod(white / "usr/share/hostapp", 0o600 | 0o020000, os.makedev(0, 0))  # deletes the hostapp's
    squashfs(white, images / "white.raw")
    squashfs(tree(src, {"usr/share/badmods/x": "x\n", f"usr/lib/modules/{KERNEL_RELEASE}/x.ko": "ko\n"}, "badmods"),
             images / "badmods.raw")
    fifo_mods = tree(src, {"usr/share/fifomods/x": "x\n"}, "fifomods")
    (fifo_mods / f"usr/lib/modules/{KERNEL_RELEASE}").mkdir(parents=True)
    os.mkfifo(fifo_mods / f"usr/lib/modules/{KERNEL_RELEASE}/Module.symvers")  # must never be opened blocking
    squashfs(fifo_mods, images / "fifomods.raw")
    (images / "garbage.raw").write_bytes(os.urandom(8192))
    good = images / "sq-tool.raw"
    used = int.from_bytes(good.read_bytes()[40:48], "little")  # the superblock's bytes_used
    (images / "trunc.raw").write_bytes(good.read_bytes()[: used - 16])
    os.mkfifo(images / "fifo.raw")
    os.symlink(str(good), images / "link.raw")
    escape = tree(src, {}, "escape")
    shutil.copytree(escape, images / "escape", symlinks=True)
    shutil.rmtree(images / "escape" / "usr")
    (images / "escape" / "usr").symlink_to("/usr")  # a hierarchy pointing out of the image
    (images / "notes.txt").write_text("not an image name: passed by\n")
    return dev, src


REFUSED = {
    "other-os": "built for OS fedora",
    "renamed": "an image for another name",
    "outside": "outside /usr, /opt",
    "white": "deletes or hides /usr/share/hostapp",
    "badmods": "without a Module.symvers",
    "garbage": "neither a squashfs nor an erofs",
    "fifomods": "Module.symvers",
    "trunc": "truncated squashfs",
    "fifo": "not a regular file",
    "link": "is a symlink, not followed",
    "escape": "usr is a symlink",
}


def loops_on(directory: Path) -> list[str]:
    """Loop devices whose backing file lies in `directory` (the kernel's own list)."""
    out = []
    for f in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            if Path(f).read_text().strip().startswith(str(directory)):
                out.append(f)
        except OSError:
            pass
    return out


def test_images_join_the_root_with_their_gates(imaged, tmp_path: Path) -> None:
    dev, src = imaged
    cmdline = f"balena_kernel_abi={ABI_ID}"
    with assembled(dev, tmp_path, cmdline) as (root, record, said):
        got = by_name(record)
        for name in GOOD:
            assert got[name]["included"], (name, got[name].get("reason"))
            assert got[name]["position"] == "sysext" and got[name]["layers"] == 1
            assert f"extension {name}: included, sysext image" in said
        for name, words in REFUSED.items():
            assert not got[name]["included"], name
            assert words in got[name]["reason"], (name, got[name]["reason"])
            assert f"extension {name}: skipped: " in said
        assert "notes" not in said and "notes.txt" not in {e["name"] for e in record["extensions"]}
        # Every file of every good image, as the kernel shows it through the root.
        for name, files in GOOD.items():
            for rel in files:
                if rel in ("usr/share/stack/which",):
                    continue
                assert (root / rel).read_bytes() == (src / name / rel).read_bytes(), (name, rel)
        assert read(root, "usr/share/stack/which") == "stack-10\n"  # the highest version on top
        assert read(root, "usr/share/hostapp/only-in-hostapp") == "replaced by sq-tool\n"
        assert read(root, "etc/passwd") is None and read(root, "usr/share/other-os/x") is None
        assert read(root, "usr/share/white/x") is None
        assert read(root, "etc/hostapp-file") is not None  # the hostapp and its extensions are there
        assert read(root, "usr/share/ext-normal/hello") == "hello from ext-normal\n"
        assert record["layout"] == "flat" and record["stacking_depth"] == 1, record.get("layout_reason")
        # The images' own mounts are gone; the root holds them through its overlay.
        assert not [m for m in mounts.mountinfo() if "/images/" in m.mount_point]
        assert loops_on(dev.data / "extensions")  # held by the root
    deadline = time.monotonic() + 10
    while loops_on(dev.data / "extensions") and time.monotonic() < deadline:
        time.sleep(0.1)  # the root was detached lazily: its loop devices clear themselves
    assert not loops_on(dev.data / "extensions")


def test_the_abi_gate_and_the_switches_apply_to_images(imaged, tmp_path: Path) -> None:
    dev, _ = imaged
    got = by_name(plan(dev))
    assert not got["mods"]["included"] and "ABI cannot be checked" in got["mods"]["reason"]
    assert got["sq-tool"]["included"]
    doc = plan(dev, "balena.nohostext")
    assert not doc["extensions"] and "disabled" in doc["disabled_reason"]
    assert not loops_on(dev.data / "extensions"), "plan left an image attached"
    assert not [m for m in mounts.mountinfo() if "/images/" in m.mount_point]


def test_nested_shows_the_same_files(imaged, tmp_path: Path) -> None:
    dev, src = imaged
    with assembled(dev, tmp_path, f"balena_kernel_abi={ABI_ID}", extra=("--layout", "nested")) as (root, record, _):
        assert record["layout"] == "nested"
        for name, files in GOOD.items():
            for rel in files:
                if rel != "usr/share/stack/which":
                    assert (root / rel).read_bytes() == (src / name / rel).read_bytes(), (name, rel)
        assert read(root, "usr/share/stack/which") == "stack-10\n"


def test_an_image_the_kernel_refuses_is_skipped_and_the_rest_boots(imaged, tmp_path: Path) -> None:
    """A squashfs whose superblock passes the header checks but whose tables are garbage."""
    dev, _ = imaged
    bad = dev.data / "extensions" / "corrupt.raw"
    data = bytearray((dev.data / "extensions" / "sq-tool.raw").read_bytes())
    for i in range(96, len(data)):
        data[i] = 0xFF
    bad.write_bytes(bytes(data))
    try:
        with assembled(dev, tmp_path) as (root, record, said):
            got = by_name(record)
            assert not got["corrupt"]["included"]
            assert "cannot mount it as squashfs" in got["corrupt"]["reason"] or "release" in got["corrupt"]["reason"]
            assert got["sq-tool"]["included"] and read(root, "usr/share/sq-tool/data") == "sq-tool data\n"
    finally:
        bad.unlink()


def test_an_interrupted_run_s_image_mounts_are_cleared(imaged, tmp_path: Path) -> None:
    """A run killed while it held an image mounted leaves it under the work directory;
    the next run detaches it before it starts, and leaves nothing either."""
    from mobynit.core import images

    dev, _ = imaged
    left = tmp_path / "work" / "images" / "0"
    left.mkdir(parents=True)
    fd = os.open(dev.data / "extensions" / "sq-tool.raw", os.O_RDONLY)
    try:
        images.mount_image(fd, str(left), "squashfs")
    finally:
        os.close(fd)
    assert [m for m in mounts.mountinfo() if m.mount_point == str(left)]
    with assembled(dev, tmp_path) as (root, record, _):
        assert by_name(record)["sq-tool"]["included"]
        assert not [m for m in mounts.mountinfo() if str(tmp_path / "work") in m.mount_point]
        assert read(root, "usr/share/sq-tool/data") == "sq-tool data\n"
