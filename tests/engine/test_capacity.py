"""Past the page-size cap: 500 layers in one root, and the drop rules beyond.

The store holds 500 single-layer extensions (every 50th an override) beside
a two-layer hostapp, written by the real engine. overlayfs stacks at most
500 lower layers, so a flat root takes the hostapp and 498 extensions: the
reference tool fitted about 20 in the same 4 KiB page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.bulk import build_bulk_device
from mobynit.core.plan import lowerdir_plus_supported
from tests.runs import assembled, mobynit, plan

pytestmark = pytest.mark.engine

OLD = "6.1.0-bulk"  # mount(2): every layer through one 4 KiB page
NEW = "6.18.0-bulk"  # fsconfig lowerdir+, one call per layer
OVERRIDES = [f"ext-{i:04d}" for i in range(0, 500, 50)]


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory):
    dev = build_bulk_device(tmp_path_factory.mktemp("bulk"), 500, overrides_every=50)
    mobynit("index", "--sysroot", str(dev.sysroot), "--data", str(dev.data))
    return dev


def included(doc: dict) -> list[str]:
    return [e["name"] for e in doc["extensions"] if e["included"]]


def check_options(doc: dict, page: int) -> None:
    for m in doc["mounts"]:
        if m["op"] == "mount":
            assert len(m["options"]) <= page - 1
            assert len(m["options"].split(":")) <= 500


@pytest.fixture
def bulk498(bulk, tmp_path: Path):
    """The bulk store less its last two extensions: a two-layer hostapp and 498 one-layer
    extensions make exactly overlayfs's 500 lower layers."""
    import shutil

    from tests.harness.device import copy_device

    dev = copy_device(bulk, tmp_path / "copy")
    for name in ("ext-0498", "ext-0499"):
        shutil.rmtree(dev.data / "docker" / "containers" / dev.extensions[name])
    # A copy has new directory ctimes, so the recorded facts are stale: index it again.
    mobynit("index", "--sysroot", str(dev.sysroot), "--data", str(dev.data))
    return dev


@pytest.mark.parametrize("release", [OLD, NEW])
def test_500_layers_with_a_4k_page(bulk498, tmp_path: Path, release: str) -> None:
    doc = plan(bulk498, release=release, extra=("--page-size", "4096"))
    assert doc["layout"] == "flat" and doc["mechanism"] == ("fsconfig" if lowerdir_plus_supported(release) else "mount")
    assert doc["stacking_depth"] == 1
    check_options(doc, 4096)
    assert len(included(doc)) == 498 and all(e["included"] for e in doc["extensions"]), "none dropped"
    lowers = doc["mounts"][0]["layers"] if doc["mechanism"] == "fsconfig" else doc["mounts"][1]["options"].split(":")
    assert len(lowers) == 500
    with assembled(bulk498, tmp_path, release=release, extra=("--page-size", "4096")) as (root, record, _):
        assert len(included(record)) == 498
        shared = set(os.listdir(root / "usr/share"))
        assert {f"ext-{i:04d}" for i in range(498)} | {"hostapp"} == shared
        assert (root / "etc/hostapp-file").read_text() == "hostapp\n"


def test_past_500_layers_the_drop_rules_apply(bulk) -> None:
    """500 extensions: flat would keep 498, nested (one lower per image) 499, so nested wins."""
    doc = plan(bulk, release=OLD, extra=("--page-size", "4096"))
    check_options(doc, 4096)
    assert doc["layout"] == "nested" and "flat root would drop 1 more extension" in doc["layout_reason"]
    dropped = {e["name"]: e["reason"] for e in doc["extensions"] if not e["included"]}
    assert list(dropped) == ["ext-0499"], "the last normal extension by name goes first"
    assert "501 lower layers, more than overlayfs's 500" in dropped["ext-0499"]


def test_small_page_drops_normal_extensions_from_the_last(bulk, tmp_path: Path) -> None:
    doc = plan(bulk, release=OLD, extra=("--page-size", "1024"))
    check_options(doc, 1024)
    names = included(doc)
    assert set(OVERRIDES) <= set(names), "overrides outlast every normal extension"
    normals = [n for n in names if n not in OVERRIDES]
    all_normals = [f"ext-{i:04d}" for i in range(500) if f"ext-{i:04d}" not in OVERRIDES]
    assert normals == all_normals[: len(normals)], "the kept normal extensions are the first by name"
    assert 200 < len(names) < 498
    with assembled(bulk, tmp_path, release=OLD, extra=("--page-size", "1024")) as (root, record, _):
        assert included(record) == names
        assert len(os.listdir(root / "usr/share")) == len(names) + 1


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory):
    """30 extensions of 20 layers each: 602 layers in all, 31 images."""
    dev = build_bulk_device(tmp_path_factory.mktemp("deep"), 30, layers=20)
    mobynit("index", "--sysroot", str(dev.sysroot), "--data", str(dev.data))
    return dev


def test_nested_when_flat_would_drop_what_nesting_keeps(deep, tmp_path: Path) -> None:
    doc = plan(deep, release=OLD)
    assert doc["layout"] == "nested" and "flat root would drop" in doc["layout_reason"]
    assert len(included(doc)) == 30
    with assembled(deep, tmp_path, release=OLD) as (root, record, _):
        assert len(included(record)) == 30
        assert (root / "usr/share/ext-0029/layer19").read_text() == "ext-0029 19\n"
