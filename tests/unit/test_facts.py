"""Layer facts: what `mobynit index` records, when it is trusted, and the flat check built on it.

The oracle is the layer itself: whiteouts and opaque directories are made
here with mknod and setxattr, so what walk() must find is known, and
flat_conflict() is asked about stacks whose overlap is chosen by hand.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mobynit.core import facts
from mobynit.core.facts import FACTS_VERSION, LayerFacts, Stack, flat_conflict

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted.* xattrs need root")


def _facts(*, whiteouts=(), opaques=(), xattrs=(), paths=(), dirs=((".", 1),)) -> LayerFacts:
    return LayerFacts(whiteouts=tuple(whiteouts), opaques=tuple(opaques), xattrs=tuple(xattrs),
                      paths=frozenset(paths), dirs=tuple(dirs))


def _stack(name: str, f: LayerFacts | None, hostapp: bool = False) -> Stack:
    return Stack(name=name, dirs=(f"/nonexistent/{name}",), facts=(f,), hostapp=hostapp)


def test_disjoint_stacks_may_be_flat() -> None:
    upper = _stack("up", _facts(whiteouts=["usr/share/up/gone"], paths=["usr", "usr/share", "usr/share/up"]))
    lower = _stack("low", _facts(paths=["usr", "usr/share", "usr/share/low", "usr/share/low/file"]))
    assert flat_conflict([upper, lower]) is None


@pytest.mark.parametrize("kind", ["whiteouts", "opaques"])
def test_a_whiteout_or_opaque_dir_reaching_below_forbids_flat(kind: str) -> None:
    upper = _stack("up", _facts(**{kind: ["usr/share/low"]}, paths=["usr", "usr/share", "usr/share/low"]))
    lower = _stack("low", _facts(paths=["usr", "usr/share", "usr/share/low", "usr/share/low/file"]))
    reason = flat_conflict([upper, lower])
    assert reason == "up: deletes or hides /usr/share/low, which a lower image has"
    # The same whiteout in the lowest image reaches nothing.
    assert flat_conflict([lower, upper]) is None


def test_unknown_facts_and_overlay_xattrs_forbid_flat() -> None:
    ok = _stack("ok", _facts(paths=["a"]))
    assert "no layer facts recorded" in flat_conflict([ok, _stack("none", None)])
    assert "carries overlay xattrs at a" in flat_conflict([ok, _stack("x", _facts(xattrs=["a"], paths=["a"]))])
    big = _stack("big", LayerFacts(whiteouts=(), opaques=(), xattrs=(), paths=None, dirs=None))
    assert "too big for its facts to be checked" in flat_conflict([ok, big])
    assert flat_conflict([ok, big.replace(hostapp=True)]) is None  # the hostapp's are taken on trust


@needs_root
def test_walk_finds_what_the_layer_holds(tmp_path: Path) -> None:
    diff = tmp_path / "diff"
    (diff / "usr/share/opaque").mkdir(parents=True)
    os.setxattr(diff / "usr/share/opaque", "trusted.overlay.opaque", b"y")
    os.mknod(diff / "usr/share/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (diff / "usr/share/file").write_text("x")
    (diff / "link").symlink_to("/etc")
    f = facts.walk(str(diff))
    assert f.whiteouts == ("usr/share/gone",)
    assert f.opaques == ("usr/share/opaque",)
    assert f.xattrs == ()
    assert f.paths == {"usr", "usr/share", "usr/share/opaque", "usr/share/gone", "usr/share/file", "link"}
    assert {rel for rel, _ in f.dirs} == {".", "usr", "usr/share", "usr/share/opaque"}


@needs_root
def test_saved_facts_are_trusted_until_the_layer_changes(tmp_path: Path) -> None:
    layer = tmp_path / ("a" * 64)
    (layer / "diff/usr").mkdir(parents=True)
    facts.save(str(layer), "a" * 64, facts.walk(str(layer / "diff")))
    doc = (layer / facts.FACTS_NAME).read_text()
    assert f'"version":{FACTS_VERSION}' in doc
    assert facts.load(str(layer), "a" * 64) == facts.walk(str(layer / "diff"))
    assert facts.load(str(layer), "b" * 64) is None  # facts of another layer
    (layer / "diff/usr/new").write_text("x")  # the directory's ctime moves on
    assert facts.load(str(layer), "a" * 64) is None
