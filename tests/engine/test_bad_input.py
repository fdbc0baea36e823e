"""Corrupted stores: an extension's fault skips it with a reason, a hostapp's fault is one clear error.

Each case corrupts a `cp -a` copy of the real store written by dockerd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.runs import ABI, assembled, by_name, mobynit, plan, read
from tests.engine.test_assemble import INCLUDED

pytestmark = pytest.mark.engine


class Target:
    """Paths of one container inside a copied device, for corrupting it."""

    def __init__(self, store: Path, cid: str) -> None:
        self.store = store
        self.cid = cid
        self.containers = store / "containers"
        self.config = store / "containers" / cid / "config.v2.json"
        self.mounts = store / "image/overlay2/layerdb/mounts" / cid
        self.mount_id = (self.mounts / "mount-id").read_text()
        self.layer = store / "overlay2" / self.mount_id
        self.lower = self.layer / "lower"
        self.first_link = self.lower.read_text().split(":")[1]  # [0] is the -init layer
        link_path = store / "overlay2" / self.first_link
        self.first_layer = store / "overlay2" / os.readlink(link_path).split("/")[1]

    def edit_config(self, change: Callable[[dict], object]) -> None:
        doc = json.loads(self.config.read_text())
        change(doc)
        self.config.write_text(json.dumps(doc))


def _set(path: str, value: object) -> Callable[[dict], object]:
    def change(doc: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[p]
        doc[last] = value

    return change


def _replace_with_symlink(path: Path, elsewhere: Path) -> None:
    subprocess.run(["cp", "-a", str(path), str(elsewhere)], check=True)  # keeps whiteout devices
    shutil.rmtree(path)
    path.symlink_to(elsewhere)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


# name -> (corruption, the file its reason must name)
CASES: dict[str, tuple[Callable[[Target, Path], object], Callable[[Target], Path]]] = {
    "config-not-json": (lambda t, tmp: t.config.write_text('{"ID": "io.balena.image.class'), lambda t: t.config),
    "config-truncated": (lambda t, tmp: t.config.write_bytes(t.config.read_bytes()[: len(t.config.read_bytes()) // 2]), lambda t: t.config),
    "config-not-utf8": (lambda t, tmp: t.config.write_bytes(b'{"io.balena.image.class": "\xff\xfe"}'), lambda t: t.config),
    "config-array": (lambda t, tmp: t.config.write_text('["io.balena.image.class"]'), lambda t: t.config),
    "labels-wrong-type": (lambda t, tmp: t.edit_config(_set("Config.Labels", {"io.balena.image.class": 1})), lambda t: t.config),
    "config-wrong-type": (lambda t, tmp: t.edit_config(_set("Config", ["io.balena.image.class"])), lambda t: t.config),
    "state-wrong-type": (lambda t, tmp: t.edit_config(_set("State.Dead", "no")), lambda t: t.config),
    "id-mismatch": (lambda t, tmp: t.edit_config(_set("ID", "0" * 64)), lambda t: t.config),
    "config-huge": (lambda t, tmp: t.config.write_bytes(t.config.read_bytes() + b" " * (5 << 20)), lambda t: t.config),
    "config-fifo": (lambda t, tmp: (t.config.write_text(t.config.read_text()), _fifo(t.config)) and None, lambda t: t.config),
    "config-symlink-out": (lambda t, tmp: (t.config.unlink(), t.config.symlink_to("/etc/passwd")), lambda t: t.config),
    "mount-id-missing": (lambda t, tmp: (t.mounts / "mount-id").unlink(), lambda t: t.mounts / "mount-id"),
    "mount-id-traversal": (lambda t, tmp: (t.mounts / "mount-id").write_text("../../../../../etc"), lambda t: t.mounts / "mount-id"),
    "mounts-dir-missing": (lambda t, tmp: shutil.rmtree(t.mounts), lambda t: t.mounts),
    "layer-dir-missing": (lambda t, tmp: shutil.rmtree(t.layer), lambda t: t.layer),
    "lower-missing": (lambda t, tmp: t.lower.unlink(), lambda t: t.lower),
    "lower-traversal": (lambda t, tmp: t.lower.write_text("l/../../../../etc"), lambda t: t.lower),
    "lower-absolute": (lambda t, tmp: t.lower.write_text("/etc:/usr"), lambda t: t.lower),
    "lower-repeats": (lambda t, tmp: t.lower.write_text(f"{t.first_link}:{t.first_link}"), lambda t: t.lower),
    "link-missing": (lambda t, tmp: (t.store / "overlay2" / t.first_link).unlink(), lambda t: t.store / "overlay2" / t.first_link),
    "link-absolute": (
        lambda t, tmp: ((t.store / "overlay2" / t.first_link).unlink(), (t.store / "overlay2" / t.first_link).symlink_to("/etc")),
        lambda t: t.store / "overlay2" / t.first_link,
    ),
    "link-escapes": (
        lambda t, tmp: ((t.store / "overlay2" / t.first_link).unlink(), (t.store / "overlay2" / t.first_link).symlink_to("../../../../../../etc/diff")),
        lambda t: t.store / "overlay2" / t.first_link,
    ),
    "link-loop": (
        lambda t, tmp: ((t.store / "overlay2" / t.first_link).unlink(), (t.store / "overlay2" / t.first_link).symlink_to(t.first_link.split("/")[1])),
        lambda t: t.store / "overlay2" / t.first_link,
    ),
    "layer-diff-symlink-out": (lambda t, tmp: _replace_with_symlink(t.first_layer / "diff", tmp / "elsewhere"), lambda t: t.first_layer / "diff"),
    "layer-dir-symlink-out": (lambda t, tmp: _replace_with_symlink(t.first_layer, tmp / "elsewhere"), lambda t: t.first_layer),
    "container-dir-symlink-out": (lambda t, tmp: _replace_with_symlink(t.config.parent, tmp / "elsewhere"), lambda t: t.config.parent),
    "container-id-not-hex": (lambda t, tmp: t.config.parent.rename(t.containers / "evil"), lambda t: t.containers / "evil"),
}


def _reason_names(reason: str, path: Path) -> bool:
    return str(path) in reason


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_extension_is_skipped_with_a_reason(device_copy, tmp_path: Path, case: str) -> None:
    corrupt, culprit = CASES[case]
    victim = Target(device_copy.data / "docker", device_copy.extensions["ext-normal"])
    named = culprit(victim)
    corrupt(victim, tmp_path)
    token = f"{ABI}={device_copy.abi_id}"  # the ABI of ext-abi's modules can be checked: it stays in
    doc = plan(device_copy, token)
    entries = [e for e in doc["extensions"] if not e["included"] and _reason_names(e.get("reason", ""), named)]
    assert len(entries) == 1, f"no single skipped entry names {named}: {doc['extensions']}"
    reason = entries[0]["reason"]
    assert "\n" not in reason
    assert {e["name"] for e in doc["extensions"] if e["included"]} == INCLUDED - {"ext-normal"}
    _assert_mounts_stay_in_stores(doc, device_copy)
    with assembled(device_copy, tmp_path, token) as (root, record, stderr):
        assert read(root, "etc/hostapp-file") == "override5\n"
        assert not (root / "usr/share/ext-normal").exists()
        assert read(root, "usr/share/ext-override/hello")
        assert "skipped: " in stderr and str(named) in stderr


def _assert_mounts_stay_in_stores(doc: dict, dev, workdir: str = "/run/mobynit/work") -> None:
    """Every lower dir is an l/ link or <id>/diff of its store, a mount point or link of ours
    in the work directory, or the empty dir; every link of ours points into a store."""
    stores = {str(dev.sysroot / "balena" / "overlay2"), str(dev.data / "docker" / "overlay2")}

    def check(cwd: str | None, lower: str) -> None:
        if lower.startswith("/"):
            assert lower == f"{workdir}/empty", lower
        elif cwd in stores:
            assert ".." not in lower.split("/")
            assert lower.startswith("l/") or lower.endswith("/diff"), lower
        else:
            assert cwd in (workdir, f"{workdir}/l"), cwd
            assert lower.isalnum() and lower.islower() or lower.isdigit(), lower

    for m in doc["mounts"]:
        if m["op"] == "mount":
            for lower in m["options"].removeprefix("lowerdir=").split(":"):
                check(m["cwd"], lower)
        elif m["op"] == "fsmount":
            for cwd, lower in m["layers"]:
                check(cwd, lower)
        elif m["op"] == "symlinks":
            for _, target in m["links"]:
                assert any(target.startswith(store + "/") for store in stores) and ".." not in target.split("/")


HOSTAPP_CASES = {
    "current-dangling": lambda d, t: ((d.sysroot / "current").unlink(), (d.sysroot / "current").symlink_to("hostapps/" + "f" * 64)),
    "current-missing": lambda d, t: (d.sysroot / "current").unlink(),
    "current-not-symlink": lambda d, t: ((d.sysroot / "current").unlink(), (d.sysroot / "current").write_text("x")),
    "current-not-an-id": lambda d, t: ((d.sysroot / "current").unlink(), (d.sysroot / "current").symlink_to("hostapps/../../etc")),
    "config-not-json": lambda d, t: t.config.write_text("{"),
    "mount-id-missing": lambda d, t: (t.mounts / "mount-id").unlink(),
    "link-missing": lambda d, t: (t.store / "overlay2" / t.first_link).unlink(),
    "layer-diff-symlink-out": lambda d, t: _replace_with_symlink(t.first_layer / "diff", Path(str(d.data)) / "elsewhere"),
}


@pytest.mark.parametrize("case", sorted(HOSTAPP_CASES))
def test_broken_hostapp_is_one_clear_error(device_copy, tmp_path: Path, case: str) -> None:
    target = Target(device_copy.sysroot / "balena", device_copy.hostapp_id)
    HOSTAPP_CASES[case](device_copy, target)
    for args in (
        ("plan", "--json"),
        ("assemble", "--target", str(tmp_path), "--workdir", str(tmp_path / "w"), "--no-record"),
        ("mount", "--target", str(tmp_path / "m"), "--workdir", str(tmp_path / "w")),
    ):
        extra = ["--data", str(device_copy.data), "--cmdline", ""] if args[0] != "mount" else []
        proc = mobynit(args[0], "--sysroot", str(device_copy.sysroot), *extra, *args[1:], check=False)
        assert proc.returncode == 1, proc
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mobynit: error: ") and "hostapp" in lines[0], proc.stderr
        assert str(device_copy.sysroot) in lines[0]
    assert not os.path.ismount(tmp_path)


def test_extension_dead_state_read_from_real_config(device) -> None:
    doc = plan(device)
    assert by_name(doc)["ext-dead"]["reason"] == "container is Dead"
