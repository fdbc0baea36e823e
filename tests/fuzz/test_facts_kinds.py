"""Every layer-facts corruption reaches the code it was written for.

The fuzzer writes facts documents with its own builder (facts_docs.facts_text);
a document rejected at the version/id gate never reaches the validators and
the staleness check it was meant to attack, and the fuzzer would pass without
testing them. Here each kind is built for a small layer made on the spot, and:

- every kind but the gate's own passes the gate (current FACTS_VERSION, the
  layer's id), and the parser's kind really is too deep to parse;
- facts.load accepts or refuses it exactly as the hand-written table in
  facts_docs.py says (FACTS_LISTS_TARGET, FACTS_DIRS_TARGET), over the whole
  grid of list kinds and ctime kinds, so each defect alone is refused and the
  truthful document is accepted;
- facts without ctimes reach flat_conflict's trust rule: taken for the
  hostapp, refused for an extension;
- the builder's own walk of the layer agrees with mobynit's (facts.walk).

Needs root (a whiteout device and a trusted.* xattr), no engine.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mobynit.core import facts
from mobynit.core.facts import FACTS_NAME, FACTS_VERSION
from tests.fuzz.facts_docs import (FACTS_DIRS, FACTS_DIRS_TARGET, FACTS_LISTS, FACTS_LISTS_TARGET, facts_accepted,
                                    facts_text, layer_truth)

LAYER_ID = "0123456789abcdef" * 4
TEXTS = ("a\nb", "usr/x", "../etc", "/etc", "", "a//b", "\udcff")  # relative paths and not


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    """overlay2/<id>/ with a diff holding files, directories, a whiteout and an opaque directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a whiteout device and a trusted.* xattr")
    layer_dir = tmp_path / "overlay2" / LAYER_ID
    diff = layer_dir / "diff"
    (diff / "usr/share/x").mkdir(parents=True)
    (diff / "usr/share/x/file").write_text("x\n")
    (diff / "etc").mkdir()
    os.mknod(diff / "etc/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (diff / "opaque").mkdir()
    os.setxattr(diff / "opaque", "trusted.overlay.opaque", b"y")
    (diff / "link").symlink_to("/etc")
    return layer_dir


def _load(layer_dir: Path, lists: str, dirs: str, text: str) -> facts.LayerFacts | None:
    data = facts_text(str(layer_dir / "diff"), LAYER_ID, lists, dirs, text)
    (layer_dir / FACTS_NAME).write_bytes(data)
    return facts.load(str(layer_dir), LAYER_ID)


def test_every_kind_has_a_target() -> None:
    assert set(FACTS_LISTS) == set(FACTS_LISTS_TARGET) and set(FACTS_DIRS) == set(FACTS_DIRS_TARGET)
    assert facts_accepted("true", "correct", "")  # the control of the grid: the truth, fresh


@pytest.mark.parametrize("lists", FACTS_LISTS)
def test_the_gate_stops_only_its_own_kinds(layer: Path, lists: str) -> None:
    data = facts_text(str(layer / "diff"), LAYER_ID, lists, "correct", "usr/x")
    target = FACTS_LISTS_TARGET[lists][0]
    if target == "parser":
        with pytest.raises(RecursionError):
            json.loads(data)
        head = data[: data.rindex(b', "x": ')] + b"}"  # the document without its nesting
        doc = json.loads(head)
    else:
        doc = json.loads(data)
    passes = doc.get("version") == FACTS_VERSION and doc.get("id") == LAYER_ID
    assert passes == (target != "gate"), (lists, doc.get("version"), doc.get("id"))


@pytest.mark.parametrize("dirs", FACTS_DIRS)
@pytest.mark.parametrize("lists", FACTS_LISTS)
def test_load_accepts_exactly_what_the_table_says(layer: Path, lists: str, dirs: str) -> None:
    texts = TEXTS if lists == "hostile" else ("a\nb",)
    for text in texts:
        loaded = _load(layer, lists, dirs, text)
        expected = facts_accepted(lists, dirs, text)
        assert (loaded is not None) == expected, (lists, dirs, text, loaded)
        if loaded is not None and lists == "true":
            truth = layer_truth(str(layer / "diff"))
            assert list(loaded.whiteouts) == truth["whiteouts"] and list(loaded.opaques) == truth["opaques"]
        if loaded is not None and lists == "hostile":
            assert text in loaded.whiteouts


def test_the_builder_agrees_with_mobynit_walk(layer: Path) -> None:
    truth = layer_truth(str(layer / "diff"))
    walked = facts.walk(str(layer / "diff"))
    assert truth["whiteouts"] == ["etc/gone"] and truth["opaques"] == ["opaque"]
    assert (list(walked.whiteouts), list(walked.opaques), walked.paths) == (
        truth["whiteouts"], truth["opaques"], frozenset(truth["paths"]))
    assert walked.dirs is not None and sorted(map(list, walked.dirs)) == sorted(truth["dirs"])


@pytest.mark.parametrize("dirs", ["correct", "none"])
def test_unchecked_facts_are_trusted_for_the_hostapp_only(layer: Path, dirs: str) -> None:
    loaded = _load(layer, "true", dirs, "")
    assert loaded is not None
    for hostapp in (True, False):
        stack = facts.Stack(name="x", dirs=(str(layer / "diff"),), facts=(loaded,), hostapp=hostapp)
        reason = facts.flat_conflict([stack])
        if dirs == "none" and not hostapp:
            assert reason is not None and "too big" in reason, reason
        else:
            assert reason is None, (dirs, hostapp, reason)
