"""The flat layout: one overlay of every layer, proved equal to the nested reference.

Each test indexes a copy of a real store (`mobynit index`), then mounts the
same selection flat and nested, with mount(2) and with the new mount API,
and compares the merged trees entry by entry.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from mobynit.core import facts
from mobynit.core import syscalls
from mobynit.core.plan import lowerdir_plus_supported
from tests.runs import ABI, assembled, mobynit, plan

pytestmark = pytest.mark.engine

OLD_KERNEL = "6.1.0-test"  # the standard device's modules are built for this release; no lowerdir+
NEW_KERNEL = "6.18.0-test"  # has lowerdir+ (kernel-version-labelled extensions drop out)


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, mode, size and content or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    detail: object = f.read()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            else:
                detail = None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), detail)
    return out


@pytest.fixture
def indexed(device_copy):
    out = mobynit("index", "--sysroot", str(device_copy.sysroot), "--data", str(device_copy.data)).stdout
    assert out.endswith("layers indexed\n") and not out.startswith("0 of")
    return device_copy


def test_index_records_facts_beside_each_layer(indexed) -> None:
    again = mobynit("index", "--sysroot", str(indexed.sysroot), "--data", str(indexed.data)).stdout
    assert again.startswith("0 of"), "layers are walked once"
    store = indexed.data / "docker" / "overlay2"
    found = {}
    for layer_dir in store.iterdir():
        if (layer_dir / facts.FACTS_NAME).exists():
            found[layer_dir.name] = facts.load(str(layer_dir), layer_dir.name)
    whiteouts = {p for f in found.values() for p in f.whiteouts}
    opaques = {p for f in found.values() for p in f.opaques}
    assert "usr/share/ext-whiteout/a" in whiteouts
    assert "usr/share/ext-whiteout/opaque" in opaques
    host = Path(indexed.sysroot / "balena" / "overlay2")
    host_whiteouts = {p for d in host.iterdir() if (d / facts.FACTS_NAME).exists() for p in facts.load(str(d), d.name).whiteouts}
    assert host_whiteouts == {"etc/to-delete"}


@pytest.mark.parametrize("release", [OLD_KERNEL, NEW_KERNEL])
def test_flat_equals_nested(indexed, tmp_path: Path, release: str) -> None:
    cmdline = f"{ABI}={indexed.abi_id}"
    doc = plan(indexed, cmdline, release=release)
    assert doc["layout"] == "flat" and doc["layout_reason"] is None and doc["stacking_depth"] == 1
    want = "fsconfig" if lowerdir_plus_supported(release) else "mount"
    assert doc["mechanism"] == want
    assert [m["op"] for m in doc["mounts"]] == (["fsmount"] if want == "fsconfig" else ["symlinks", "mount", "unlink"])
    included = sum(e["layers"] for e in doc["extensions"] if e["included"]) + len(doc["hostapp"]["layers"])
    if want == "mount":
        assert len(doc["mounts"][1]["options"].split(":")) == included
    else:
        assert len(doc["mounts"][0]["layers"]) == included
    flat_dir, nested_dir = tmp_path / "flat", tmp_path / "nested"
    flat_dir.mkdir()
    nested_dir.mkdir()
    with assembled(indexed, flat_dir, cmdline, release=release) as (flat, record, stderr):
        assert record["layout"] == "flat" and record["mechanism"] == want
        if want == "fsconfig" and not lowerdir_plus_supported(os.uname().release):
            assert record["fallbacks"] and "mount(2)" in record["fallbacks"][0]
        else:
            assert record["fallbacks"] == []
        with assembled(indexed, nested_dir, cmdline, release=release, extra=("--layout", "nested")) as (nested, nrec, _):
            assert nrec["layout"] == "nested"
            assert tree(flat) == tree(nested)
        assert (flat / "usr/share/ext-whiteout/b").exists() and not (flat / "usr/share/ext-whiteout/a").exists()
        assert not (flat / "etc/to-delete").exists()
        work = flat_dir / "work"
        assert not work.exists() or os.listdir(work) == [], "the layer links are gone once mounted"


def test_flat_root_can_be_stacked_on(indexed, tmp_path: Path) -> None:
    """Depth 1: the booted system can still put an overlay on its root; nested cannot."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for layout, depth in (("auto", 1), ("nested", 2)):
        run_dir = tmp_path / layout
        run_dir.mkdir()
        with assembled(indexed, run_dir, extra=("--layout", layout)) as (root, record, _):
            assert record["stacking_depth"] == depth
            upper = run_dir / "stacked"
            upper.mkdir()
            if depth == 1:
                syscalls.mount("overlay", str(upper), "overlay", syscalls.MS_RDONLY, f"lowerdir={root}:{empty}")
                try:
                    assert (upper / "etc/hostapp-file").read_text() == "override5\n"
                finally:
                    syscalls.umount(str(upper))
            else:
                with pytest.raises(OSError) as err:
                    syscalls.mount("overlay", str(upper), "overlay", syscalls.MS_RDONLY, f"lowerdir={root}:{empty}")
                assert err.value.errno == errno.EINVAL


def test_flat_root_leaves_no_intermediate_mounts(indexed, tmp_path: Path) -> None:
    before = {line.split()[4] for line in open("/proc/self/mountinfo")}
    with assembled(indexed, tmp_path) as (root, record, _):
        after = {line.split()[4] for line in open("/proc/self/mountinfo")}
        assert after - before == {str(root)}


def _facts_files(dev) -> list[Path]:
    return sorted((dev.data / "docker" / "overlay2").glob(f"*/{facts.FACTS_NAME}"))


@pytest.mark.parametrize(
    "corrupt",
    ["garbage", "wrong-id", "symlink", "fifo", "huge", "traversal", "wrong-types", "old-version"],
)
def test_bad_facts_mean_nested(indexed, corrupt: str) -> None:
    """A stale or hostile facts file never makes boot flat on faith, nor fail."""
    victim = next(p for p in _facts_files(indexed) if "ext-whiteout/a" in p.read_text())
    doc = json.loads(victim.read_text())
    if corrupt == "garbage":
        victim.write_bytes(b"\xff{{not json")
    elif corrupt == "wrong-id":
        doc["id"] = "0" * 64
        doc["whiteouts"] = []
        victim.write_text(json.dumps(doc))
    elif corrupt == "symlink":
        victim.unlink()
        victim.symlink_to("/etc/hostname")
    elif corrupt == "fifo":
        victim.unlink()
        os.mkfifo(victim)
    elif corrupt == "huge":
        victim.write_bytes(b" " * (facts.FACTS_LIMIT + 1))
    elif corrupt == "traversal":
        doc["whiteouts"] = ["../../../etc/passwd"]
        victim.write_text(json.dumps(doc))
    elif corrupt == "wrong-types":
        doc["paths"] = {"a": 1}
        victim.write_text(json.dumps(doc))
    elif corrupt == "old-version":
        doc["version"] = 0
        victim.write_text(json.dumps(doc))
    out = plan(indexed)
    assert out["layout"] == "nested"
    assert "no layer facts" in out["layout_reason"] and "ext-whiteout" in out["layout_reason"]


@pytest.mark.parametrize("plant", ["whiteout", "opaque"])
def test_stale_facts_never_let_an_override_delete_hostapp_files(indexed, tmp_path: Path, plant: str) -> None:
    """A layer changed after `mobynit index` (never done by Docker, done here by hand):
    its facts no longer hold, so the root is nested and the hostapp keeps its files."""
    store = indexed.data / "docker"
    mount_id = (store / "image/overlay2/layerdb/mounts" / indexed.extensions["ext-override5"] / "mount-id").read_text()
    link = (store / "overlay2" / mount_id / "lower").read_text().split(":")[1]
    diff = store / "overlay2" / os.readlink(store / "overlay2" / link).split("/")[1] / "diff"
    if plant == "whiteout":
        (diff / "usr/share/hostapp").mkdir(parents=True)
        os.mknod(diff / "usr/share/hostapp/only-in-hostapp", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    else:
        (diff / "usr/share").mkdir(parents=True, exist_ok=True)
        os.setxattr(diff / "usr/share", "trusted.overlay.opaque", b"y")
    doc = plan(indexed)
    assert doc["layout"] == "nested" and "stale" in doc["layout_reason"] and "ext-override5" in doc["layout_reason"]
    with assembled(indexed, tmp_path) as (root, record, _):
        assert (root / "usr/share/hostapp/only-in-hostapp").read_text() == "only in hostapp\n"
        assert (root / "etc/hostapp-file").read_text() == "override5\n"


def test_unverifiable_extension_facts_are_not_trusted() -> None:
    """Facts of a layer too big to check for staleness count for the hostapp only."""
    big = facts.LayerFacts(whiteouts=(), opaques=(), xattrs=(), paths=None, dirs=None)
    small = facts.LayerFacts(whiteouts=(), opaques=(), xattrs=(), paths=frozenset({"a"}), dirs=((".", 1),))
    host = facts.Stack(name="hostapp", dirs=("/h",), facts=(big,), hostapp=True)
    ext = facts.Stack(name="ext", dirs=("/e",), facts=(small,))
    assert facts.flat_conflict([ext, host]) is None
    bad = facts.Stack(name="big-ext", dirs=("/e",), facts=(big,))
    assert "too big" in facts.flat_conflict([bad, host])


def test_whiteout_reaching_below_forces_nested(hostile_indexed) -> None:
    doc = plan(hostile_indexed)
    assert doc["layout"] == "nested"
    assert "deletes or hides" in doc["layout_reason"]


@pytest.fixture
def hostile_indexed(hostile, tmp_path: Path):
    from tests.harness.device import copy_device

    dev = copy_device(hostile, tmp_path / "copy")
    mobynit("index", "--sysroot", str(dev.sysroot), "--data", str(dev.data))
    return dev


from tests.engine.test_semantics import hostile  # noqa: E402,F401  (the module-scoped device with hostile whiteouts)
