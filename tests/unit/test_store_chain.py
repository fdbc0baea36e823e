"""The store is reached through real directories on its partition only.

A minimal overlay2 store is written here by hand (one container, one image
layer), so the oracle is the tree the test made: the container reads; with
any level of the chain between the partition and a layer replaced by a
symlink to an identical copy outside, or by a mount of another file
system, reading fails and names that level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mobynit.core.errors import StoreError
from mobynit.core.store import Store

CID = "c" * 64
MOUNT_ID = "a" * 64
LAYER = "b" * 64
LINK = "L" * 26
CHAIN = ("docker", "docker/containers", "docker/image", "docker/image/overlay2", "docker/image/overlay2/layerdb",
         "docker/image/overlay2/layerdb/mounts", "docker/overlay2", "docker/overlay2/l")


def _store(data: Path) -> None:
    root = data / "docker"
    (root / "containers" / CID).mkdir(parents=True)
    (root / "containers" / CID / "config.v2.json").write_text(
        f'{{"ID": "{CID}", "Name": "/ext", "Config": {{"Labels": {{"io.balena.image.class": "overlay"}}}}}}')
    (root / "image/overlay2/layerdb/mounts" / CID).mkdir(parents=True)
    (root / "image/overlay2/layerdb/mounts" / CID / "mount-id").write_text(MOUNT_ID)
    (root / "overlay2" / MOUNT_ID / "diff").mkdir(parents=True)
    (root / "overlay2" / MOUNT_ID / "lower").write_text(f"l/{LINK}")
    (root / "overlay2" / LAYER / "diff" / "usr").mkdir(parents=True)
    (root / "overlay2/l").mkdir()
    (root / "overlay2/l" / LINK).symlink_to(f"../{LAYER}/diff")


def test_a_store_of_real_directories_reads(tmp_path: Path) -> None:
    _store(tmp_path / "data")
    c = Store(str(tmp_path / "data/docker")).container(CID)
    assert [layer.id for layer in c.layers] == [LAYER] and c.name == "ext"


# and below the store's own levels: each container's and layer's directories
OWN = (f"docker/overlay2/{MOUNT_ID}", f"docker/overlay2/{LAYER}", f"docker/overlay2/{LAYER}/diff",
       f"docker/image/overlay2/layerdb/mounts/{CID}", f"docker/containers/{CID}")


@pytest.mark.parametrize("level", CHAIN + OWN)
def test_a_symlinked_level_is_never_followed(tmp_path: Path, level: str) -> None:
    data = tmp_path / "data"
    _store(data)
    outside = tmp_path / "outside"
    shutil.copytree(data / level, outside, symlinks=True)
    shutil.rmtree(data / level)
    (data / level).symlink_to(outside)
    with pytest.raises(StoreError, match=f"^{data / level}: is a symlink, not followed$"):
        Store(str(data / "docker")).container(CID)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("level", ("docker/image", "docker/overlay2"))
def test_a_level_on_another_file_system_is_never_crossed(tmp_path: Path, level: str) -> None:
    data = tmp_path / "data"
    _store(data)
    saved = tmp_path / "saved"
    shutil.copytree(data / level, saved, symlinks=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(data / level)], check=True)
    try:
        shutil.copytree(saved, data / level, symlinks=True, dirs_exist_ok=True)
        with pytest.raises(StoreError, match=f"^{data / level}: on another file system"):
            Store(str(data / "docker")).container(CID)
    finally:
        subprocess.run(["umount", str(data / level)], check=True)


def test_scan_of_a_symlinked_store_root_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store(tmp_path / "elsewhere")
    data.mkdir()
    (data / "docker").symlink_to(tmp_path / "elsewhere/docker")
    with pytest.raises(StoreError, match="docker: is a symlink, not followed"):
        Store(str(data / "docker")).scan(lambda labels: True, "6.1.0")
