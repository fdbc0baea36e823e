"""Hostile stores: random corruptions of a real dockerd store never sink a boot nor escape it.

A copy of the standard device (written by dockerd, see docs/harness.md) is
made once per module (arena.py); each hypothesis example applies several
corruptions to it (corruptions.py: one named function per kind, a corruption
is a plain tuple), runs `mobynit plan` (in-process, JSON and text) and
`mobynit assemble` (a subprocess, in this test's private mount namespace),
checks the properties below (checks.py), and then undoes its corruptions. Undoing
is a journal of renames: every path is moved aside before it is changed and
moved back after, so an example costs milliseconds, not a copy of the store;
the restored tree is compared with the original after every example.

Corruptions never write through a symlink: every path is checked component
by component from the top of the copy before it is touched, so a symlink one
example plants cannot lead the next one (or the harness) outside the copy.
Symlinks point at *mirrors*, second copies of the data store and of the
hostapp store whose every layer holds a canary file: if the canary shows up
in an assembled root, a layer was mounted from outside the store.

Extension side (the data store), asserted for every example:
- `plan --json` exits 0, no traceback; the hostapp is in the plan; every
  extension entry is included or has a one-line, printable `reason`; when a
  directory of the store's chain (DATA/docker, image, image/overlay2,
  layerdb, layerdb/mounts, containers, overlay2, overlay2/l) is not a real
  directory, no extension is included;
- every mount stays in its store, by device and inode: each lower dir, as
  the kernel resolves it, is a layer directory (`overlay2/<id>/diff`) that
  the partitions hold through real directories only, of the hostapp store for
  the hostapp's mount, of the data store for an extension's; relative lower
  dirs are `l/<26 [A-Z0-9]>` or `<64 hex>/diff`; absolute ones not in a store
  are in the work directory;
- the store read shared out among processes (mobynit.core.fanout, forced)
  finds what the one-process read finds, fault for fault, with every
  child's results used (none read again here), and really did fork
  whenever `containers` lists four entries or more;
- `plan` as text encodes as strict UTF-8 and has exactly one line per item;
- `assemble` exits 0, no traceback, every stderr line is `mobynit: ...`;
  the root holds the hostapp's files (unless a facts document the reader
  trusts by design was forged) and no canary; the only new mount is the
  root, whose lower dirs (as /proc/self/mountinfo shows them) are
  store-relative, in the work directory or store layers; nothing is left
  mounted in the work directory.

Hostapp side: corruptions that always break the hostapp (SYSROOT/balena
itself included) give exit status 1 and exactly one `mobynit: error:` line,
from `plan` and `assemble` alike.

Flat against nested: under corruptions of the metadata only, the default
(flat when the facts allow) root and the `--layout nested` one hold the same
files; uncorrupted, the default is flat.

MOBYNIT_FUZZ_EXAMPLES sets the number of extension-side examples (default
300); MOBYNIT_FUZZ_HOSTAPP_EXAMPLES the hostapp side's (default 60);
MOBYNIT_FUZZ_DIFF_EXAMPLES flat against nested (default 40). See docs/fuzzing.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.fuzz.arena import Arena, snapshot
from tests.fuzz.checks import (DEFAULT, VARIANTS, Variant, check_assembled, check_decisions, check_fanout,
                               check_mounts, check_text, detach, one_error, run_assemble, run_plan, tree)
from tests.fuzz.corruptions import (NODE_KINDS, SYMLINK_KINDS, _hostile_bytes, _id_text, _json_value, _link_target,
                                    _lower_entry, _name_text, JSON_PATHS, apply, apply_hostapp, corruption,
                                    hostapp_corruption)
from tests.harness import mounts
from tests.harness.device import KERNEL_RELEASE, StandardDevice

pytestmark = pytest.mark.engine

EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_EXAMPLES", "300"))
HOSTAPP_EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_HOSTAPP_EXAMPLES", "60"))
DIFF_EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_DIFF_EXAMPLES", "40"))

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def arena(device: StandardDevice, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    a = Arena(device, tmp_path_factory.mktemp("fuzz"))
    yield a
    a.reset()
    assert snapshot(a.store) == a.snapshot, "the journal did not restore the store"
    assert snapshot(device.data / "docker") == a.device_snapshot, "the session's device was modified"


def _restored(a: Arena, corruptions: list[tuple], sysroot_touched: bool) -> None:
    assert snapshot(a.store) == a.snapshot, f"undoing {corruptions} did not restore the store"
    if sysroot_touched:
        assert snapshot(a.dev.sysroot) == a.hsnapshot, f"undoing {corruptions} did not restore the sysroot"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=HEALTH)
@given(st.lists(corruption, min_size=1, max_size=5), st.sampled_from(VARIANTS))
@example([("json-deep", 3, 5000)], DEFAULT)  # bug 1: a deeply nested config.v2.json raised RecursionError
@example([("symlink", ("g", "l"), "mirror")], DEFAULT)  # bug 2: a symlinked overlay2/l led a mount outside the store
@example([("new-container", "a\nb", "config")], DEFAULT)  # bug 3: a directory name's newline in a reason
@example([("new-container", "\udcff\udcfe", "config")], DEFAULT)  # bug 3: ... and its non-UTF-8 bytes
@example([("plant", 9, 1, "usr/share/hostapp/only-in-hostapp", "whiteout")], VARIANTS[1])  # override, stale facts
@example([("plant", 9, 1, "usr/share", "opaque")], DEFAULT)
@example([("plant", 8, 1, "usr/share/hostapp/only-in-hostapp", "opaque", True)], DEFAULT)  # replaced, not deleted
@example([("release", 0, 1, "a\nb", "huge", True)], DEFAULT)  # bug 5: a release file's name, raw, in a reason
@example([("link", 0, 1, "via-l"), ("lower", ("c", 0, "top_lower", 0), ["l/..", "dup"]), ("node", ("g", "l"), "fifo")], DEFAULT)
# the store's chain, level by level: a symlink or a special file at any level is never followed
@example([("symlink", ("g", "containers"), "mirror")], DEFAULT)
@example([("symlink", ("g", "overlay2"), "mirror-rel")], DEFAULT)
@example([("symlink", ("g", "mounts"), "mirror")], DEFAULT)
@example([("node", ("g", "root"), "fifo")], DEFAULT)
@example([("node", ("g", "layerdb"), "zero-dev")], DEFAULT)
@example([("symlink", ("g", "root"), "mirror")], DEFAULT)
@example([("symlink", ("g", "image"), "mirror")], DEFAULT)
@example([("symlink", ("g", "image-overlay2"), "mirror-rel")], DEFAULT)
@example([("symlink", ("g", "layerdb"), "mirror")], DEFAULT)
# facts on the hostapp's layers (unchecked, stale); an override's whiteout of a hostapp file
# recorded truthfully afterwards (fresh facts that name it: nested, the file stays)
@example([("facts", "hostapp", 0, "unlisted", "none", "")], DEFAULT)
@example([("facts", "hostapp", 1, "true", "stale", "")], DEFAULT)
@example([("plant", 9, 1, "usr/share/hostapp/only-in-hostapp", "whiteout"), ("facts", 9, 1, "true", "correct", "")], DEFAULT)
def test_hostile_extension_store(arena: Arena, corruptions: list[tuple], variant: Variant) -> None:
    a = arena
    assert not a.broken, "an earlier example could not be undone; the copy is unusable"
    try:
        for c in corruptions:
            apply(a, c)
            event(f"corruption: {c[0]}")
        sysroot_touched = a.touched_sysroot()
        status, out, err = run_plan(a, variant, "--json")
        assert status == 0, err
        doc = json.loads(out)
        event(f"extensions included: {sum(e['included'] for e in doc['extensions'])} of {len(doc['extensions'])}")
        check_decisions(a, doc)
        check_mounts(a, doc)
        event(f"store read shared out: {check_fanout(a, variant[0]) > 0}")
        status, text, err = run_plan(a, variant)
        assert status == 0, err
        check_text(text, doc)
        proc, record = run_assemble(a, variant)
        try:
            check_assembled(a, proc, record, doc)
        finally:
            detach(a)
    finally:
        a.reset()
    _restored(a, corruptions, sysroot_touched)


# --- flat against nested ------------------------------------------------------------------------------
#
# The flat layout (one overlay of every layer) is only allowed when the layers' facts say it
# means what nesting means. Corruptions of the store's metadata (which containers, which layers,
# in what order) keep the facts true, so on those the two roots must hold the same files.
# Corruptions of layer contents or of the facts themselves are left out here: stale facts are
# a separate question (see the plant examples above).

META_PARTS = ("cdir", "config", "hostconfig", "mdir", "mount_id", "init_id", "top_lower", "top_link", "layer_link",
              "layer_lower", "lnk")
_meta_where = st.tuples(st.just("c"), st.integers(0, 14), st.sampled_from(META_PARTS), st.integers(0, 3))
metadata_corruption = st.one_of(
    st.tuples(st.just("node"), _meta_where, st.sampled_from(NODE_KINDS)),
    st.tuples(st.just("symlink"), _meta_where, st.sampled_from(SYMLINK_KINDS)),
    st.tuples(st.just("truncate"), _meta_where, st.floats(0, 1)),
    st.tuples(st.just("content"), _meta_where, _hostile_bytes),
    st.tuples(st.just("json"), st.integers(0, 14), st.sampled_from(JSON_PATHS), _json_value),
    st.tuples(st.just("mount-id"), st.integers(0, 14), _id_text),
    st.tuples(st.just("lower"), _meta_where, st.lists(_lower_entry, min_size=0, max_size=5)),
    st.tuples(st.just("link"), st.integers(0, 14), st.integers(0, 3), _link_target),
    st.tuples(st.just("swap"), st.integers(0, 14), st.integers(0, 14), st.sampled_from(META_PARTS), st.integers(0, 3)),
    st.tuples(st.just("rename"), st.integers(0, 14), _name_text),
)


@settings(max_examples=DIFF_EXAMPLES, deadline=None, suppress_health_check=HEALTH)
@given(st.lists(metadata_corruption, min_size=0, max_size=4), st.sampled_from([KERNEL_RELEASE, os.uname().release]))
@example([], KERNEL_RELEASE)
@example([], os.uname().release)
def test_flat_root_equals_nested(arena: Arena, corruptions: list[tuple], release: str) -> None:
    a = arena
    assert not a.broken, "an earlier example could not be undone; the copy is unusable"
    roots = []
    try:
        for c in corruptions:
            apply(a, c)
        status, out, err = run_plan(a, (release, ()), "--json")
        assert status == 0, err
        doc = json.loads(out)
        for extra in ((), ("--layout", "nested")):
            proc, record = run_assemble(a, (release, extra))
            try:
                check_assembled(a, proc, record, doc)
                assert record is not None
                roots.append((record, tree(a.target)))
            finally:
                detach(a)
    finally:
        a.reset()
    (auto, auto_tree), (nested, nested_tree) = roots
    event(f"auto layout: {auto['layout']}")
    if not corruptions:  # the standard device, indexed: its facts allow flat, and a planner that always nests is wrong
        assert auto["layout"] == "flat", f"the uncorrupted device was not flattened: {auto.get('layout_reason')}"
    included = [[e["id"] for e in r["extensions"] if e["included"]] for r in (auto, nested)]
    assert included[0] == included[1]
    assert nested["layout"] == "nested" or not included[1]  # the hostapp alone is one mount either way
    if auto_tree != nested_tree:
        only = sorted(set(auto_tree) ^ set(nested_tree))[:10]
        changed = sorted(k for k in set(auto_tree) & set(nested_tree) if auto_tree[k] != nested_tree[k])[:10]
        raise AssertionError(f"the {auto['layout']} root differs from the nested one: in one only {only}, "
                             f"different {changed} ({auto.get('layout_reason')})")


# --- the hostapp side --------------------------------------------------------------------------------


@settings(max_examples=HOSTAPP_EXAMPLES, deadline=None, suppress_health_check=HEALTH)
@given(st.lists(hostapp_corruption, min_size=1, max_size=3))
@example([("current", "loop")])
@example([("json", ("State",), 1)])
@example([("truncate", "config", 0.0), ("json", ("ID",), 1)])
@example([("store", "fifo")])
@example([("store", "loop2")])
@example([("store", "mirror")])
@example([("node", ("layer_diff", 1), "delete")])
def test_hostile_hostapp_is_one_error(arena: Arena, corruptions: list[tuple]) -> None:
    a = arena
    assert not a.broken, "an earlier example could not be undone; the copy is unusable"
    try:
        for c in corruptions:
            apply_hostapp(a, c)
        status, out, err = run_plan(a, DEFAULT, "--json")
        assert status == 1 and out == "", (corruptions, out, err)
        one_error(err)
        proc, record = run_assemble(a, DEFAULT)
        try:
            assert "Traceback" not in proc.stderr, proc.stderr
            assert proc.returncode == 1 and record is None, proc.stderr
            one_error(proc.stderr)
            assert not os.path.ismount(a.target)
            assert not mounts.mounts_under(str(a.work.parent))
        finally:
            detach(a)
    finally:
        a.reset()
    assert snapshot(a.dev.sysroot) == a.hsnapshot, f"undoing {corruptions} did not restore the sysroot"
