"""Container extensions going live, from a store written by the real engine.

Which can go live (docs/live.md): not requires-reboot=true, every file under
a merged hierarchy, no deletions, and a normal (non-override) one replaces no
file of the running root. The merged tree is compared file by file with the
union the test computes from the files it gave the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import mounts
from tests.harness.device import OVERLAY_CLASS, ExtensionSpec, HostappSpec, Layer, build_device
from tests.unit.test_live import tree

pytestmark = pytest.mark.engine


def ext(name: str, files: dict[str, str], **labels: str) -> ExtensionSpec:
    return ExtensionSpec(name=name, layers=(Layer(files=files),), labels={**OVERLAY_CLASS, **labels})


LIVE = {
    "live-ok": {"usr/share/live-ok/hello": "hello\n", "opt/live-ok/data": "data\n"},
    "live-override": {"usr/bin/base": "overridden\n"},
}


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory):
    extensions = (
        ext("live-ok", LIVE["live-ok"]),
        ext("live-override", LIVE["live-override"], **{"io.balena.image.override": "5"}),
        ext("wait-reboot", {"usr/share/wait-reboot/x": "x\n"}, **{"io.balena.image.requires-reboot": "true"}),
        ext("wait-etc", {"usr/share/wait-etc/x": "x\n", "etc/wait-etc.conf": "x\n"}),
        ext("wait-shadow", {"usr/bin/base": "shadow\n"}),
        ExtensionSpec(name="wait-whiteout", layers=(Layer(files={"usr/share/ww/a": "a\n"}),
                                                    Layer(files={"usr/share/ww/b": "b\n"}, delete=["usr/share/ww/a"])),
                      labels=dict(OVERLAY_CLASS)),
    )
    return build_device(tmp_path_factory.mktemp("live"), HostappSpec(), extensions)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "mobynit", *args], capture_output=True, text=True, timeout=120)
    assert not check or done.returncode == 0, done.stderr
    return done


def test_container_extensions_go_live_when_they_can(device, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "opt").mkdir()
    (root / "usr/bin/base").write_text("base\n")
    store = str(device.data / "docker")
    try:
        listed = json.loads(run("list", "--root", str(root), "--data-store", store, "--json").stdout)
        verdicts = {e["name"]: e for e in listed["extensions"]}
        assert verdicts["live-ok"]["merged"] and verdicts["live-override"]["merged"]
        assert "requires-reboot" in verdicts["wait-reboot"]["reason"]
        assert "outside" in verdicts["wait-etc"]["reason"]
        assert "would replace /usr/bin/base" in verdicts["wait-shadow"]["reason"]
        assert "whiteout" in verdicts["wait-whiteout"]["reason"]
        assert all(not v["merged"] for k, v in verdicts.items() if k.startswith("wait-"))

        before = tree(root / "usr")
        run("merge", "--root", str(root), "--data-store", store)
        want = dict(before)
        for rel, text in LIVE["live-ok"].items():
            if rel.startswith("usr/"):
                want.update({p: ("dir", "") for p in _parents(rel[4:])})
                want[rel[4:]] = ("file", text)
        want["bin/base"] = ("file", "overridden\n")
        assert tree(root / "usr") == want
        assert tree(root / "opt") == {"live-ok": ("dir", ""), "live-ok/data": ("file", "data\n")}
        target = os.path.realpath(root / "usr")
        assert [m.source for m in mounts.mountinfo() if m.mount_point == target] == ["mobynit-live.1"]
    finally:
        run("unmerge", "--root", str(root), "--quiet", check=False)
    assert tree(root / "usr") == {"bin": ("dir", ""), "bin/base": ("file", "base\n")}


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def test_the_runtime_merges_an_installed_extension_live(device, tmp_path: Path) -> None:
    """What `start` does after its hook: merge live on a mobynit-booted system, say why not otherwise."""
    from mobynit.core.record import BootRecord, Hostapp
    from mobynit.runtime.commands import merge_live

    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/base").write_text("base\n")
    store = str(device.data / "docker")
    ok, wait = device.extensions["live-ok"], device.extensions["wait-reboot"]
    assert "not booted by mobynit" in merge_live(ok, store, str(root))[1]
    BootRecord(hostapp=Hostapp(id="a" * 64, name="hostapp", layers=()), extensions=(), disabled_by=None,
               disabled_reason=None, kernel_release="6", page_size=4096, target="/sysroot", layout="flat",
               layout_reason=None, mechanism="fsconfig", stacking_depth=1).write(str(root / "run/mobynit/boot.json"))
    try:
        assert merge_live(ok, store, str(root)) == ("info", f"extension {ok}: merged live into /usr")
        assert (root / "usr/share/live-ok/hello").read_text() == "hello\n"
        level, said = merge_live(wait, store, str(root))
        assert "requires-reboot=true: waits for the next boot" in said
    finally:
        run("unmerge", "--root", str(root), "--quiet", check=False)
