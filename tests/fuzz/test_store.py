"""Hostile stores: random corruptions of a real dockerd store never sink a boot nor escape it.

A copy of the standard device (written by dockerd, see docs/harness.md) is
made once per module; each hypothesis example applies several corruptions to
it, runs `mobynit plan` (in-process, JSON and text) and `mobynit assemble`
(a subprocess, in this test's private mount namespace), checks the
properties below, and then undoes its corruptions. Undoing is a journal of
renames: every path is moved aside before it is changed and moved back
after, so an example costs milliseconds, not a copy of the store; the
restored tree is compared with the original after every example.

Corruptions never write through a symlink: every path is checked component
by component before it is touched, so a symlink one example plants cannot
lead the next one (or the harness) outside the copy. Symlinks point at a
*mirror*, a second copy of the store whose every layer holds a canary file:
if the canary shows up in an assembled root, a layer was mounted from
outside the store.

Extension side (the data store), asserted for every example:
- `plan --json` exits 0, no traceback; the hostapp is in the plan; every
  extension entry is included or has a one-line, printable `reason`;
- every mount stays in its store: the hostapp's mount runs in the hostapp
  store's overlay2 directory, an extension's in the data store's, the root's
  in none; each relative lower dir is `l/<26 [A-Z0-9]>` or `<64 hex>/diff`
  and really resolves (realpath) to `<cwd>/<layer id>/diff`; absolute ones
  are under the work directory;
- `plan` as text encodes as strict UTF-8 and has exactly one line per item;
- `assemble` exits 0, no traceback, every stderr line is `mobynit: ...`;
  the root holds the hostapp's /etc/hostapp-file and no canary; the only
  new mount is the root, whose lower dirs (as /proc/self/mountinfo shows
  them) are store-relative or in the work directory; nothing is left mounted
  in the work directory.

Hostapp side: corruptions that always break the hostapp give exit status 1
and exactly one `mobynit: error:` line, from `plan` and `assemble` alike.

Flat against nested: under corruptions of the metadata only, the default
(flat when the facts allow) root and the `--layout nested` one hold the same files.

MOBYNIT_FUZZ_EXAMPLES sets the number of extension-side examples (default
300); MOBYNIT_FUZZ_HOSTAPP_EXAMPLES the hostapp side's (default 60);
MOBYNIT_FUZZ_DIFF_EXAMPLES flat against nested (default 40). See docs/fuzzing.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.harness import mounts
from tests.harness.device import KERNEL_RELEASE, StandardDevice, copy_device
from mobynit.tools import cli
from mobynit.core import syscalls

pytestmark = pytest.mark.engine

EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_EXAMPLES", "300"))
HOSTAPP_EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_HOSTAPP_EXAMPLES", "60"))
CANARY = "ESCAPED-FROM-THE-STORE"
HEX = frozenset("0123456789abcdef")
LINK_CHARS = frozenset(string.ascii_uppercase + string.digits)
MARKER = "io.balena.image.class"
HUGE = 5 << 30  # sparse: costs nothing on disk
PLAN_TIMEOUT = 60  # seconds; a store that hangs the reader would hang a boot
FACTS = "mobynit-facts.json"  # `mobynit index` records each layer's whiteouts here (when it can)
# Hostapp files that no extension of the standard device deletes: no corruption may make them vanish.
HOSTAPP_FILES = ("etc/hostapp-file", "usr/share/hostapp/only-in-hostapp")


# --- the arena: a copy to corrupt, a mirror to point at, and a journal to undo ---------------


class Journal:
    """Every change to the copy, undone in reverse order by renaming the originals back."""

    def __init__(self, root: Path, stash: Path) -> None:
        self.root = root
        self.stash = stash
        self.entries: list[tuple[str, str | None]] = []
        self.count = 0

    def safe(self, rel: str) -> bool:
        """True if every ancestor of `rel` below the root is a real directory (no symlink)."""
        parts = rel.split("/")
        path = str(self.root)
        for part in parts[:-1]:
            path = f"{path}/{part}"
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return False
            except OSError:
                return False
        return bool(parts[-1]) and parts[-1] not in (".", "..")

    def take(self, rel: str) -> str | None:
        """Move `rel` aside (remembering it) so it can be replaced; None if unsafe to touch."""
        if not self.safe(rel):
            return None
        path = f"{self.root}/{rel}"
        try:
            os.fsencode(path)
        except UnicodeEncodeError:  # a lone surrogate outside surrogateescape's range: no such name on disk
            return None
        saved: str | None = None
        if os.path.lexists(path):
            self.count += 1
            saved = f"{self.stash}/{self.count}"
            os.rename(path, saved)
        self.entries.append((rel, saved))
        return path

    def saved_bytes(self) -> bytes | None:
        """The bytes of the file the last take() moved aside, if it was a regular file."""
        saved = self.entries[-1][1] if self.entries else None
        if saved is None or not stat.S_ISREG(os.lstat(saved).st_mode):
            return None
        with open(saved, "rb") as f:
            return f.read(1 << 20)

    def undo(self) -> None:
        while self.entries:
            rel, saved = self.entries.pop()
            path = f"{self.root}/{rel}"
            _remove(path)
            if saved is not None:
                os.rename(saved, path)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Type, size, link target, device number and (outside diff dirs) bytes of every entry."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif name == FACTS:  # holds ctimes, which undoing changes: presence is what counts
                out[rel] = (stat.S_IFMT(st.st_mode), "facts")
                continue
            elif stat.S_ISREG(st.st_mode) and "/diff/" not in rel and st.st_size < 1 << 16:
                with open(path, "rb") as f:
                    extra = f.read()
            elif stat.S_ISCHR(st.st_mode):
                extra = st.st_rdev
            out[rel] = (kind, st.st_mode & 0o7777, st.st_size if kind != stat.S_IFDIR else 0, extra)
    return out


class Container:
    """Where one container's pieces live in a store, relative to the store root."""

    def __init__(self, store: Path, cid: str) -> None:
        self.cid = cid
        self.cdir = f"containers/{cid}"
        self.config = f"{self.cdir}/config.v2.json"
        self.mdir = f"image/overlay2/layerdb/mounts/{cid}"
        self.mount_id = (store / self.mdir / "mount-id").read_text()
        self.top = f"overlay2/{self.mount_id}"
        lower = (store / self.top / "lower").read_text().split(":")
        self.links = [entry.split("/")[1] for entry in lower]  # [0] is the -init layer's
        self.layers = [os.readlink(store / "overlay2/l" / link).split("/")[1] for link in self.links]

    def part(self, name: str, k: int) -> str:
        """A path of this container, by part name; `k` picks a layer of its lower chain."""
        k %= len(self.layers)
        layer = f"overlay2/{self.layers[k]}"
        return {
            "cdir": self.cdir,
            "config": self.config,
            "hostconfig": f"{self.cdir}/hostconfig.json",
            "mdir": self.mdir,
            "mount_id": f"{self.mdir}/mount-id",
            "init_id": f"{self.mdir}/init-id",
            "top": self.top,
            "top_diff": f"{self.top}/diff",
            "top_lower": f"{self.top}/lower",
            "top_link": f"{self.top}/link",
            "layer": layer,
            "layer_diff": f"{layer}/diff",
            "layer_link": f"{layer}/link",
            "layer_lower": f"{layer}/lower",
            "lnk": f"overlay2/l/{self.links[k]}",
            "layer_facts": f"{layer}/{FACTS}",
        }[name]


GLOBALS = {
    "containers": "containers",
    "overlay2": "overlay2",
    "l": "overlay2/l",
    "mounts": "image/overlay2/layerdb/mounts",
    "layerdb": "image/overlay2/layerdb",
    "image": "image",
}
PARTS = ("cdir", "config", "hostconfig", "mdir", "mount_id", "init_id", "top", "top_diff", "top_lower",
         "top_link", "layer", "layer_diff", "layer_link", "layer_lower", "lnk", "layer_facts")


class Arena:
    """The copy under attack, with everything the corruptions and checks need to know about it."""

    def __init__(self, device: StandardDevice, base: Path) -> None:
        self.pristine = device
        self.dev = copy_device(device, base / "copy")
        self.store = self.dev.data / "docker"
        self.hstore = self.dev.sysroot / "balena"
        self.overlay2 = os.path.realpath(self.store / "overlay2")
        self.hoverlay2 = os.path.realpath(self.hstore / "overlay2")
        self.stash = base / "stash"
        self.stash.mkdir()
        self.mirror = base / "mirror" / "docker"
        self.mirror.parent.mkdir()
        subprocess.run(["cp", "-a", str(device.data / "docker"), str(self.mirror)], check=True)
        for diff in (self.mirror / "overlay2").glob("*/diff"):
            (diff / CANARY).write_text("a layer from outside the store was mounted\n")
        self.decoy = base / "decoy"
        (self.decoy / "diff").mkdir(parents=True)
        (self.decoy / CANARY).write_text("decoy\n")
        (self.decoy / "diff" / CANARY).write_text("decoy\n")
        self.work = base / "work"
        self.target = base / "root"
        self.target.mkdir()
        names = sorted(device.extensions)
        self.cids = [device.extensions[n] for n in names] + list(device.apps)
        self.containers = [Container(self.store, cid) for cid in self.cids]
        self.all_links = sorted(os.listdir(self.store / "overlay2/l"))
        self.all_layers = sorted(n for n in os.listdir(self.store / "overlay2") if n != "l")
        self.broken = False
        self.indexed = _index(self.dev)
        self.journal = Journal(self.store, self.stash)
        (base / "hstash").mkdir()
        self.hjournal = Journal(self.dev.sysroot, base / "hstash")  # the hostapp's os-release only
        self.snapshot = _snapshot(self.store)
        self.device_snapshot = _snapshot(device.data / "docker")
        self.hcontainer = Container(self.hstore, device.hostapp_id)
        self.hsnapshot = _snapshot(self.dev.sysroot)
        self.names = sorted(device.extensions) + [f"app-{n}" for n in range(len(device.apps))]

    def mirror_of(self, rel: str) -> str:
        return str(self.mirror / rel)

    def reset(self) -> None:
        """Undo every corruption; index again if a layer's contents were touched.

        Facts carry the ctimes of the layer's directories, which the undoing renames
        change: left alone they would read as stale from then on, and every later
        example would be nested, never flat.
        """
        touched = any("/diff" in rel for rel, _ in (*self.journal.entries, *self.hjournal.entries))
        self.broken = True  # until the undo is through: later examples must not run on a half-restored copy
        self.journal.undo()
        self.hjournal.undo()
        self.broken = False
        if touched and self.indexed:
            _index(self.dev, "--force")
        for leftover in os.listdir(self.stash):
            if leftover != "hostapp":
                _remove(str(self.stash / leftover))


def _index(dev: StandardDevice, *extra: str) -> bool:
    """Record layer facts in the copy with `mobynit index`, when this mobynit has it."""
    args = ["--sysroot", str(dev.sysroot), "--data", str(dev.data), "--kernel-release", KERNEL_RELEASE, *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["index", *args])
    if status == 2 and "index" in err.getvalue():  # no such command in this mobynit
        return False
    assert status == 0, err.getvalue()
    return True


@pytest.fixture(scope="module")
def arena(device: StandardDevice, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    a = Arena(device, tmp_path_factory.mktemp("fuzz"))
    yield a
    a.reset()
    assert _snapshot(a.store) == a.snapshot, "the journal did not restore the store"
    assert _snapshot(device.data / "docker") == a.device_snapshot, "the session's device was modified"


# --- corruptions ------------------------------------------------------------------------------
#
# Each corruption is a plain tuple, so a failing one can be pasted into @example():
#   (kind, where, *params)   where = ("g", global name) | ("c", container index, part, layer index)

_where_c = st.tuples(st.just("c"), st.integers(0, 14), st.sampled_from(PARTS), st.integers(0, 3))
_where_g = st.tuples(st.just("g"), st.sampled_from(sorted(GLOBALS)))
_where = st.one_of(_where_c, _where_c, _where_c, _where_g)

_SYMLINK_KINDS = ("mirror", "mirror-rel", "decoy", "hostapp", "etc", "self", "loop2", "dangling", "dotdot", "dev")
_NODE_KINDS = ("delete", "empty-file", "dir", "fifo", "huge", "whiteout", "zero-dev")

_hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../..", "/", "/etc", "\n", "a\nb", "\x1b[31mred", "\udcff", "\x00", "l/..", "", " ", "-init"]),
)
_hostile_bytes = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\xff\xfe", b"..", b"../../../../etc", b"/etc", b"\x00", b"\n" * 3, b"\xc3\x28"]),
)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _hostile_text,
    st.sampled_from(["overlay", "1", "true", "/name", "0" * 64]),
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_hostile_text, inner, max_size=3)),
    max_leaves=8,
)
_JSON_PATHS = (
    (), ("ID",), ("Name",), ("Driver",), ("Config",), ("Config", "Labels"), ("Config", "Labels", MARKER),
    ("Config", "Labels", "io.balena.image.override"), ("Config", "Labels", "io.balena.image.kernel-version"),
    ("Config", "Labels", "io.balena.image.kernel-abi-id"), ("Config", "Labels", "io.balena.features.host-extension"),
    ("State",), ("State", "Dead"), ("State", "RemovalInProgress"), ("Image",),
)

_id_text = st.one_of(
    _hostile_text,
    st.sampled_from(["other-mount-id", "other-layer-id", "init", "upper", "mirror", "63hex", "newline"]),
)
_lower_entry = st.one_of(
    st.sampled_from(["l/..", "l/../../../../etc", "/etc", "../..", "l/", "l", "other", "self", "init", "hexdiff",
                     "mirror-abs", "l/link/..", "long", "dup", "lowercase"]),
    _hostile_text,
)
_link_target = st.one_of(
    st.sampled_from(["abs-mirror", "escape", "other", "init", "diff-dotdot", "diff-dotdot-diff", "self", "via-l",
                     "two-ids", "trailing-slash", "no-diff", "mirror-rel", "bytes"]),
    _hostile_text,
)
_name_text = st.one_of(
    st.sampled_from(["evil", "\udcff\udcfe", "a\nb", "\x1b[2J", "0" * 64, "A" * 64, "0" * 63, ".hidden", "-init",
                     "x" * 200]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=30),
)

_release_text = st.one_of(
    st.lists(
        st.tuples(st.sampled_from(["ID", "VERSION_ID", "SYSEXT_LEVEL", "ARCHITECTURE", "ID_LIKE", "SYSEXT_SCOPE", "X Y", "#"]),
                  _hostile_text),
        max_size=6,
    ).map(lambda kv: "\n".join(f"{k}={v}" for k, v in kv).encode("utf-8", "surrogateescape")),
    st.binary(max_size=200),
    st.sampled_from([b'ID="open\nVERSION_ID=7', b"ID=_any\n", b"ID=balena-os\nVERSION_ID=6.0.0\n",
                     b"ID=balena-os\nVERSION_ID=7.0.0\nARCHITECTURE=arm64\n", b"\\" * 1000, b"ID=" + b"'" * 5000]),
)
_payload = st.one_of(st.sampled_from(_NODE_KINDS[1:] + _SYMLINK_KINDS), _release_text)

PLANT_PATHS = ("usr/share/hostapp/only-in-hostapp", "usr/share/hostapp", "usr/share", "etc/hostapp-file", "etc",
               "bin/busybox", "a\nb", "\x1b[2J", "usr/share/hostapp/\udcff")

corruption = st.one_of(
    st.tuples(st.just("node"), _where, st.sampled_from(_NODE_KINDS)),
    st.tuples(st.just("symlink"), _where, st.sampled_from(_SYMLINK_KINDS)),
    st.tuples(st.just("truncate"), _where_c, st.floats(0, 1)),
    st.tuples(st.just("garble"), _where_c, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("content"), _where_c, _hostile_bytes),
    st.tuples(st.just("json"), st.integers(0, 14), st.sampled_from(_JSON_PATHS), _json_value),
    st.tuples(st.just("json-deep"), st.integers(0, 14), st.sampled_from([50, 900, 5000, 200000])),
    st.tuples(st.just("json-raw"), st.integers(0, 14), _json_value),
    st.tuples(st.just("mount-id"), st.integers(0, 14), _id_text),
    st.tuples(st.just("lower"), _where_c, st.lists(_lower_entry, min_size=0, max_size=5)),
    st.tuples(st.just("link"), st.integers(0, 14), st.integers(0, 3), _link_target),
    st.tuples(st.just("swap"), st.integers(0, 14), st.integers(0, 14), st.sampled_from(PARTS), st.integers(0, 3)),
    st.tuples(st.just("rename"), st.integers(0, 14), _name_text),
    st.tuples(st.just("new-container"), _name_text, st.sampled_from(["config", "symlink", "fifo", "file", "deep"])),
    st.tuples(st.just("plant"), st.integers(0, 14), st.integers(0, 3), st.sampled_from(PLANT_PATHS),
              st.sampled_from(["whiteout", "opaque", "file", "symlink-out"]), st.booleans()),
    st.tuples(st.just("facts"), st.integers(0, 14), st.integers(0, 3), st.sampled_from(["nothing", "hostile", "deep", "types"]),
              _hostile_text),
    st.tuples(st.just("release"), st.integers(0, 14), st.integers(0, 3),
              st.sampled_from(["own", "other", "a\nb", "\udcff", "..", "*"]), _payload, st.booleans()),
    st.tuples(st.just("os-release"), st.sampled_from(["etc/os-release", "usr/lib/os-release"]), _payload),
    st.tuples(st.just("modules"), st.integers(0, 3), st.sampled_from(["lib", "lib/modules", f"lib/modules/{KERNEL_RELEASE}",
              f"lib/modules/{KERNEL_RELEASE}/Module.symvers"]), st.sampled_from(_NODE_KINDS + _SYMLINK_KINDS)),
)


def _rel(a: Arena, where: tuple) -> str:
    if where[0] == "g":
        return GLOBALS[where[1]]
    _, i, part, k = where
    return a.containers[i % len(a.containers)].part(part, k)


def _ensure_parents(journal: Journal, rel: str) -> bool:
    """Create the missing directories above `rel`, journalling the topmost one; False if one is not a directory."""
    parts = rel.split("/")
    for n in range(1, len(parts)):
        above = "/".join(parts[:n])
        path = f"{journal.root}/{above}"
        if not os.path.lexists(path):
            if journal.take(above) is None:
                return False
            os.makedirs(f"{journal.root}/{'/'.join(parts[:-1])}")
            return True
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    return True


def _make_node(a: Arena, rel: str, kind: str, journal: Journal | None = None) -> None:
    path = (journal or a.journal).take(rel)
    if path is None:
        return
    if kind == "delete":
        return
    if kind == "empty-file":
        Path(path).write_bytes(b"")
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(HUGE)
    elif kind == "whiteout":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    elif kind == "zero-dev":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless if read
    else:
        raise AssertionError(kind)


def _make_symlink(a: Arena, rel: str, kind: str, journal: Journal | None = None) -> None:
    journal = journal or a.journal
    path = journal.take(rel)
    if path is None:
        return
    parent = os.path.dirname(path)
    target = {
        "mirror": a.mirror_of(rel),
        "mirror-rel": os.path.relpath(a.mirror_of(rel), parent),
        "decoy": str(a.decoy),
        "hostapp": str(a.hstore / a.hcontainer.part("layer", 1)),
        "etc": "/etc",
        "self": os.path.basename(path),
        "dangling": "no-such-thing",
        "dotdot": "../" * 12 + "etc",
        "dev": "/dev/zero",
    }.get(kind)
    if kind == "loop2":
        other = rel + ".loop"
        other_path = journal.take(other)
        if other_path is None:
            return
        os.symlink(os.path.basename(path), other_path)
        target = os.path.basename(other_path)
    assert target is not None, kind
    os.symlink(target, path)


def _plant(a: Arena, c: Container, k: int, where: str, how: str) -> None:
    """Put a whiteout, an opaque directory, a file or an outward symlink at `where` in one of c's layers."""
    diff = c.part("layer_diff", k)
    if how in ("file", "symlink-out"):
        where += "-planted"  # an override may replace hostapp files: only deleting them is wrong
    parts = where.split("/")
    rel = diff
    for n, part in enumerate(parts):  # take the first missing (or last) component: undo removes it whole
        rel = f"{rel}/{part}"
        path = f"{a.store}/{rel}"
        if n == len(parts) - 1 or not os.path.lexists(path) or not stat.S_ISDIR(os.lstat(path).st_mode):
            break
    full = f"{a.store}/{diff}/{where}"
    if a.journal.take(rel) is None:
        return
    if rel != f"{diff}/{where}":
        os.makedirs(os.path.dirname(full), exist_ok=True)
    if how == "whiteout":
        os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    elif how == "opaque":
        os.mkdir(full)
        os.setxattr(full, "trusted.overlay.opaque", b"y")
    elif how == "file":
        Path(full).write_text("planted\n")
    else:
        os.symlink(str(a.decoy), full)


def _forget_facts(a: Arena, c: Container, k: int) -> None:
    """Remove the facts `mobynit index` recorded for a layer whose contents were just changed.

    Left in place they are stale, and a reader that trusts them never looks at the change
    (which is the point of some examples, and defeats others).
    """
    a.journal.take(c.part("layer_facts", k))


def _put(a: Arena, journal: Journal, rel: str, payload: str | bytes) -> None:
    """A file with these bytes, or a node of this kind, at `rel`, creating its directories."""
    if not _ensure_parents(journal, rel):
        return
    if isinstance(payload, bytes):
        path = journal.take(rel)
        if path is not None:
            Path(path).write_bytes(payload)
    elif payload in _NODE_KINDS:
        _make_node(a, rel, payload, journal)
    else:
        _make_symlink(a, rel, payload, journal)


def _copy(src: str, dest: str) -> None:
    """cp -a: keeps whiteout devices, opaque xattrs and symlinks as they are."""
    subprocess.run(["cp", "-a", "--no-dereference", src, dest], check=True)


def _write(a: Arena, rel: str, data: bytes) -> None:
    path = a.journal.take(rel)
    if path is not None:
        Path(path).write_bytes(data)


def _rewrite(a: Arena, rel: str, change) -> None:  # type: ignore[no-untyped-def]
    """Replace a regular file with change(its bytes); leaves anything else alone."""
    path = f"{a.store}/{rel}"
    if not a.journal.safe(rel):
        return
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
    except OSError:
        return
    if a.journal.take(rel) is None:
        return
    old = a.journal.saved_bytes() or b""
    Path(path).write_bytes(change(old))


def _config_doc(a: Arena, i: int) -> tuple[str, dict] | None:
    rel = a.containers[i % len(a.containers)].config
    path = f"{a.store}/{rel}"
    if not a.journal.safe(rel):
        return None
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return (rel, doc) if isinstance(doc, dict) else None


def _set_json(doc: dict, path: tuple, value: object) -> object:
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        nxt = node.get(key) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value
    return doc


def _id_value(a: Arena, i: int, text: str) -> bytes:
    c = a.containers[i % len(a.containers)]
    other = a.containers[(i + 1) % len(a.containers)]
    special = {
        "other-mount-id": other.mount_id,
        "other-layer-id": c.layers[-1],
        "init": c.mount_id + "-init",
        "upper": c.mount_id.upper(),
        "mirror": str(a.mirror / "overlay2" / c.mount_id),
        "63hex": c.mount_id[:63],
        "newline": c.mount_id + "\n\n",
    }
    return os.fsencode(special.get(text, text))


def _lower_value(a: Arena, c: Container, entries: list[str]) -> bytes:
    def one(e: str) -> str:
        return {
            "other": f"l/{a.all_links[len(e) % len(a.all_links)]}",
            "self": f"l/{c.links[0]}",
            "init": f"l/{c.links[0]}",
            "hexdiff": f"{c.layers[-1]}/diff",
            "mirror-abs": str(a.mirror / "overlay2" / c.layers[-1] / "diff"),
            "l/link/..": f"l/{c.links[-1]}/..",
            "long": ":".join(f"l/{x}" for x in a.all_links) * 3,
            "dup": f"l/{c.links[-1]}:l/{c.links[-1]}",
            "lowercase": f"l/{c.links[-1].lower()}",
        }.get(e, e)

    return os.fsencode(":".join(one(e) for e in entries))


def _link_value(a: Arena, c: Container, k: int, text: str) -> str | bytes:
    lid = c.layers[k % len(c.layers)]
    other = a.all_layers[(k + 3) % len(a.all_layers)]
    link = c.links[k % len(c.links)]
    return {
        "abs-mirror": str(a.mirror / "overlay2" / lid / "diff"),
        "escape": f"../../../../../../{a.mirror.relative_to('/')}/overlay2/{lid}/diff",
        "other": f"../{other}/diff",
        "init": f"../{c.mount_id}-init/diff",
        "diff-dotdot": f"../{lid}/diff/..",
        "diff-dotdot-diff": f"../{lid}/diff/../diff",
        "self": link,
        "via-l": f"../l/{link}",
        "two-ids": f"../{lid}/../{other}/diff",
        "trailing-slash": f"../{lid}/diff/",
        "no-diff": f"../{lid}",
        "mirror-rel": os.path.relpath(a.mirror / "overlay2" / lid / "diff", a.store / "overlay2/l"),
        "bytes": b"../\xff\xfe/diff",
    }.get(text, text)


def apply(a: Arena, c: tuple) -> None:
    kind = c[0]
    if kind == "node":
        _make_node(a, _rel(a, c[1]), c[2])
    elif kind == "symlink":
        _make_symlink(a, _rel(a, c[1]), c[2])
    elif kind == "truncate":
        _rewrite(a, _rel(a, c[1]), lambda b: b[: int(len(b.rstrip()) * c[2])])
    elif kind == "garble":

        def garble(b: bytes) -> bytes:
            data = bytearray(b)
            for pos, val in c[2]:
                if data:
                    data[pos % len(data)] = val
            return bytes(data)

        _rewrite(a, _rel(a, c[1]), garble)
    elif kind == "content":
        _write(a, _rel(a, c[1]), c[2])
    elif kind in ("json", "json-deep", "json-raw"):
        found = _config_doc(a, c[1])
        if found is None:
            return
        rel, doc = found
        if kind == "json":
            new = _set_json(doc, c[2], c[3])
            text = json.dumps(new)
        elif kind == "json-deep":
            _set_json(doc, ("Config", "Labels"), {MARKER: "overlay"})
            text = json.dumps(doc)[:-1] + f', "Deep": {_deep(c[2])}}}'
        else:
            text = json.dumps({"marker": MARKER, "doc": c[2]})
        _write(a, rel, text.encode("utf-8", "surrogatepass"))
    elif kind == "mount-id":
        _write(a, a.containers[c[1] % len(a.containers)].part("mount_id", 0), _id_value(a, c[1], c[2]))
    elif kind == "lower":
        rel = _rel(a, c[1])
        cont = a.containers[c[1][1] % len(a.containers)]
        _write(a, rel if rel.endswith("/lower") else cont.part("top_lower", 0), _lower_value(a, cont, c[2]))
    elif kind == "link":
        cont = a.containers[c[1] % len(a.containers)]
        rel = cont.part("lnk", c[2])
        target = _link_value(a, cont, c[2], c[3])
        if not target or (b"\x00" if isinstance(target, bytes) else "\x00") in target:
            return  # symlink(2) takes neither
        path = a.journal.take(rel)
        if path is not None:
            os.symlink(target, os.fsencode(path) if isinstance(target, bytes) else path)
    elif kind == "swap":
        x = a.containers[c[1] % len(a.containers)].part(c[3], c[4])
        y = a.containers[c[2] % len(a.containers)].part(c[3], c[4])
        if x == y or x.startswith(y + "/") or y.startswith(x + "/"):
            return
        if not all(a.journal.safe(r) and os.path.lexists(f"{a.store}/{r}") for r in (x, y)):
            return
        a.journal.take(x)
        a.journal.take(y)
        (_, saved_y), (_, saved_x) = a.journal.entries[-1], a.journal.entries[-2]
        assert saved_x is not None and saved_y is not None
        _copy(saved_y, f"{a.store}/{x}")
        _copy(saved_x, f"{a.store}/{y}")
    elif kind == "rename":
        cont = a.containers[c[1] % len(a.containers)]
        new = f"containers/{c[2]}"
        if new == cont.cdir or "/" in c[2] or c[2] in (".", ".."):
            return
        if not (a.journal.safe(cont.cdir) and os.path.lexists(f"{a.store}/{cont.cdir}")):
            return
        if a.journal.take(new) is None or a.journal.take(cont.cdir) is None:
            return
        saved = a.journal.entries[-1][1]
        assert saved is not None
        _copy(saved, f"{a.store}/{new}")
    elif kind == "new-container":
        name, how = c[1], c[2]
        if "/" in name or name in (".", ".."):
            return
        rel = f"containers/{name}"
        path = a.journal.take(rel)
        if path is None:
            return
        if how == "symlink":
            os.symlink(a.mirror_of(a.containers[0].cdir), path)
        elif how == "fifo":
            os.mkfifo(path)
        elif how == "file":
            Path(path).write_text(MARKER)
        else:
            os.mkdir(path)
            body = {"ID": name, "Name": "/" + name, "Config": {"Labels": {MARKER: "overlay"}}}
            text = json.dumps(body, ensure_ascii=False) if how == "config" else json.dumps(body)[:-1] + f', "x": {_deep(100000)}}}'
            Path(path, "config.v2.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    elif kind == "plant":
        _plant(a, a.containers[c[1] % len(a.containers)], c[2], c[3], c[4])
        if c[5:6] == (True,):
            _forget_facts(a, a.containers[c[1] % len(a.containers)], c[2])
    elif kind == "facts":
        cont = a.containers[c[1] % len(a.containers)]
        rel = cont.part("layer_facts", c[2])
        lid = cont.layers[c[2] % len(cont.layers)]
        lists = {"whiteouts": [], "opaques": [], "xattrs": [], "paths": []}
        if c[3] == "hostile":
            lists = {"whiteouts": [c[4], "usr/share/hostapp/only-in-hostapp"], "opaques": [c[4]], "xattrs": [],
                     "paths": [c[4], "usr", "usr/share", "usr/share/hostapp"]}
        doc: object = {"version": 1, "id": lid, **lists}
        if c[3] == "types":
            doc = {"version": 1, "id": lid, "whiteouts": c[4], "opaques": {c[4]: 1}, "xattrs": None, "paths": 7}
        text = json.dumps(doc)
        if c[3] == "deep":
            text = text[:-1] + f', "x": {_deep(100000)}}}'
        _write(a, rel, text.encode())
    elif kind == "release":  # systemd-sysext's file, which a compatibility gate reads
        i = c[1] % len(a.containers)
        name = {"own": a.names[i], "other": a.names[(i + 1) % len(a.names)]}.get(c[3], c[3])
        rel = f"{a.containers[i].part('layer_diff', c[2])}/usr/lib/extension-release.d/extension-release.{name}"
        _put(a, a.journal, rel, c[4])
        if c[5:6] == (True,):
            _forget_facts(a, a.containers[i], c[2])
    elif kind == "os-release":  # the hostapp's: unreadable or garbled, it must not stop a boot
        _put(a, a.hjournal, f"balena/{a.hcontainer.part('layer_diff', -1)}/{c[1]}", c[2])
    elif kind == "modules":
        abi = a.containers[sorted(a.pristine.extensions).index("ext-abi")]
        rel = f"{abi.part('layer_diff', 1)}/{c[2]}" if c[1] % 2 else f"{abi.part('top_diff', 0)}/{c[2]}"
        if c[3] in _NODE_KINDS:
            _make_node(a, rel, c[3])
        else:
            _make_symlink(a, rel, c[3])
    else:
        raise AssertionError(kind)


# --- running mobynit -----------------------------------------------------------------------


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"mobynit took more than {seconds} s on this store: a boot would hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _supports_layout() -> bool:
    """Whether this mobynit has `plan --layout` (flat or nested root): ask its help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(["plan", "--help"])
        except SystemExit:  # argparse exits after --help
            pass
    return "--layout" in out.getvalue()


# How to run mobynit: (kernel release, extra options). The standard device's modules were
# built for KERNEL_RELEASE; the running kernel's release also lets a planner use the new
# mount API (lowerdir+, Linux >= 6.8) when it knows how.
VARIANTS: list[tuple[str, tuple[str, ...]]] = [(KERNEL_RELEASE, ()), (os.uname().release, ())]
if _supports_layout():
    VARIANTS += [(KERNEL_RELEASE, ("--layout", "nested")), (os.uname().release, ("--layout", "nested"))]
DEFAULT = VARIANTS[0]


def _common(a: Arena, variant: tuple[str, tuple[str, ...]]) -> list[str]:
    release, extra = variant
    return ["--sysroot", str(a.dev.sysroot), "--data", str(a.dev.data), "--cmdline", "",
            "--kernel-release", release, "--workdir", str(a.work), *extra]


def run_plan(a: Arena, variant: tuple[str, tuple[str, ...]], *extra: str) -> tuple[int, str, str]:
    """`mobynit plan` in this process: (status, stdout, stderr); stdout must be strict UTF-8."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.StringIO()
    with _deadline(PLAN_TIMEOUT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["plan", *_common(a, variant), *extra])
    out.flush()
    return status, out.buffer.getvalue().decode("utf-8"), err.getvalue()  # type: ignore[attr-defined]


def run_assemble(a: Arena, variant: tuple[str, tuple[str, ...]]) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    record = a.work.parent / "record.json"
    record.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mobynit", "assemble", *_common(a, variant), "--target", str(a.target),
         "--record", str(record)],
        capture_output=True, text=True, errors="backslashreplace", timeout=PLAN_TIMEOUT,
    )
    doc = json.loads(record.read_text()) if record.exists() else None
    return proc, doc


def _is_link_entry(entry: str) -> bool:
    head, _, link = entry.partition("/")
    return head == "l" and len(link) == 26 and LINK_CHARS.issuperset(link)


def _is_diff_entry(entry: str) -> bool:
    lid, _, diff = entry.partition("/")
    return diff == "diff" and len(lid) == 64 and HEX.issuperset(lid)


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _lower_dirs(doc: dict) -> Iterator[tuple[dict, str | None, str]]:
    """(operation, cwd, lower dir) for every lower dir of every mount the plan makes."""
    for op in doc["mounts"]:
        if op["op"] == "mount":
            options = [o for o in (op["options"] or "").split(",") if o.startswith("lowerdir=")]
            assert len(options) == 1, op
            for entry in options[0].removeprefix("lowerdir=").split(":"):
                yield op, op["cwd"], entry
        elif op["op"] == "fsmount":
            for cwd, entry in op["layers"]:
                yield op, cwd, entry


def check_mounts(a: Arena, doc: dict) -> None:
    """Every lower dir of every mount is a layer of the store its owner came from, or in the work dir.

    Relative dirs named from a store's overlay2 directory must have the store's
    own forms (`l/<26>` or `<64 hex>/diff`), and their real path (symlinks
    followed, as the kernel will) must be `<that overlay2>/<layer id>/diff`.
    Links the plan itself makes (`symlinks` operations) are followed on paper.
    """
    work = str(a.work)
    stores = {str(a.hstore / "overlay2"): a.hoverlay2, str(a.store / "overlay2"): a.overlay2}
    ext_ids = {e["id"] for e in doc["extensions"]}
    host_layers = {os.path.realpath(p) for p in doc["hostapp"]["layers"]}
    links: dict[str, str] = {}
    for op in doc["mounts"]:
        if op["op"] == "symlinks":
            assert _under(op["target"], work), op
            for name, target in op["links"]:
                assert "/" not in name and name not in (".", ".."), op
                links[f"{op['target']}/{name}"] = target
    for op, cwd, entry in _lower_dirs(doc):
        owner = op["owner"]
        assert owner in ("root", "hostapp") or owner in ext_ids, op
        assert ".." not in entry.split("/") and entry, (entry, op)
        if cwd is not None:
            assert cwd in stores or cwd == work or _under(cwd, work), op
            if cwd in stores and not entry.startswith("/"):
                assert _is_link_entry(entry) or _is_diff_entry(entry), (entry, op)
                if owner != "root":  # the flat root's layers come from both stores
                    assert (cwd == str(a.hstore / "overlay2")) == (owner == "hostapp"), op
        path = entry if entry.startswith("/") else os.path.join(cwd or "/", entry)
        assert entry.startswith("/") or cwd is not None, (entry, op)
        path = links.get(path, path)
        if _under(path, work):
            continue
        real = os.path.realpath(path)
        home = next((r for r in stores.values() if _under(real, r)), None)
        assert home is not None, f"{entry} (from {cwd}) resolves to {real}, outside both stores: {op}"
        lid, _, rest = os.path.relpath(real, home).partition("/")
        assert rest == "diff" and _is_diff_entry(f"{lid.removesuffix('-init')}/diff"), (real, op)
        if home == a.hoverlay2:
            assert owner == "hostapp" or real in host_layers, f"{real} is a hostapp-store layer, not the hostapp's: {op}"
        else:
            assert owner != "hostapp", f"the hostapp's mount uses {real} from the data store: {op}"


def check_decisions(doc: dict, hostapp_id: str) -> None:
    assert doc["hostapp"]["id"] == hostapp_id
    assert doc["hostapp"]["layers"], doc["hostapp"]
    for key in ("disabled_reason", "layout_reason"):
        assert doc.get(key) is None or doc[key].isprintable(), f"{key} is not one printable line: {doc[key]!r}"
    for e in doc["extensions"]:
        if e["included"]:
            assert "reason" not in e, e
        else:
            reason = e.get("reason")
            assert isinstance(reason, str) and reason, e
            assert reason.isprintable(), f"reason is not one printable line: {reason!r}"


def check_text(text: str, doc: dict) -> None:
    """The text plan: printable lines, one per item before the mounts, nothing that forges another."""
    lines = text.splitlines()
    assert text.endswith("\n") and len(text.split("\n")) == len(lines) + 1, text
    for line in lines:
        assert line.isprintable(), repr(line)
    head = next(i for i, line in enumerate(lines) if line.startswith("mounts"))
    layout = any(e["included"] for e in doc["extensions"])  # the layout line, when the root holds extensions
    expected = 1 + len(doc["hostapp"]["layers"]) + 1 + sum(1 + ("warning" in e) for e in doc["extensions"]) + layout
    assert head == expected, text


def check_assembled(a: Arena, proc: subprocess.CompletedProcess[str], record: dict | None, plan_doc: dict) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    for line in proc.stderr.splitlines():
        assert line.startswith("mobynit: ") and line.isprintable(), f"forged or raw stderr line: {line!r}"
    assert record is not None
    check_decisions(record, a.dev.hostapp_id)
    check_mounts(a, record)
    planned = {e["id"] for e in plan_doc["extensions"] if e["included"]}
    assert {e["id"] for e in record["extensions"] if e["included"]} <= planned
    for rel in HOSTAPP_FILES:  # an override may replace one (by a directory, even), never delete it
        assert os.path.lexists(a.target / rel), f"the assembled root lacks the hostapp's /{rel}"
    assert not (a.target / CANARY).exists(), "a layer from outside the store was mounted"
    new = [m for m in mounts.mountinfo() if _under(m.mount_point, str(a.work.parent))]
    assert [m.mount_point for m in new] == [str(a.target)], new
    assert new[0].fstype == "overlay"
    for key, value in _super_options(str(a.target)):
        entries = value.split(":") if key == "lowerdir" else [value] if key == "lowerdir+" else []
        for entry in entries:
            assert entry and ".." not in entry.split("/"), (key, value)
            if entry.startswith("/"):
                real = os.path.realpath(entry)
                assert _under(entry, str(a.work)) or _under(real, a.overlay2) or _under(real, a.hoverlay2), entry
            else:
                assert _is_link_entry(entry) or _is_diff_entry(entry) or "/" not in entry, entry


def _super_options(mount_point: str) -> list[tuple[str, str]]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if mounts._unescape(left.split()[4]) == mount_point:
                opts = mounts._unescape(right.split()[2])
                return [(k, v) for k, _, v in (o.partition("=") for o in opts.split(","))]
    raise AssertionError(f"{mount_point} is not mounted")


def _detach(a: Arena) -> None:
    for m in mounts.mounts_under(str(a.target), str(a.work)):
        with contextlib.suppress(OSError):
            syscalls.umount(m.mount_point, syscalls.MNT_DETACH)


# --- the properties --------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@FUZZ
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
def test_hostile_extension_store(arena: Arena, corruptions: list[tuple], variant: tuple[str, tuple[str, ...]]) -> None:
    a = arena
    assert not a.broken, "an earlier example could not be undone; the copy is unusable"
    try:
        for c in corruptions:
            apply(a, c)
            event(f"corruption: {c[0]}")
        status, out, err = run_plan(a, variant, "--json")
        assert status == 0, err
        doc = json.loads(out)
        event(f"extensions included: {sum(e['included'] for e in doc['extensions'])} of {len(doc['extensions'])}")
        check_decisions(doc, a.dev.hostapp_id)
        check_mounts(a, doc)
        status, text, err = run_plan(a, variant)
        assert status == 0, err
        check_text(text, doc)
        proc, record = run_assemble(a, variant)
        try:
            check_assembled(a, proc, record, doc)
        finally:
            _detach(a)
    finally:
        a.reset()
    assert _snapshot(a.store) == a.snapshot, f"undoing {corruptions} did not restore the store"
    if any(c[0] == "os-release" for c in corruptions):
        assert _snapshot(a.dev.sysroot) == a.hsnapshot, f"undoing {corruptions} did not restore the sysroot"


# --- flat against nested ------------------------------------------------------------------------------
#
# The flat layout (one overlay of every layer) is only allowed when the layers' facts say it
# means what nesting means. Corruptions of the store's metadata (which containers, which layers,
# in what order) keep the facts true, so on those the two roots must hold the same files.
# Corruptions of layer contents or of the facts themselves are left out here: stale facts are
# a separate question (see the plant examples above).

DIFF_EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_DIFF_EXAMPLES", "40"))
META_PARTS = ("cdir", "config", "hostconfig", "mdir", "mount_id", "init_id", "top_lower", "top_link", "layer_link",
              "layer_lower", "lnk")
_meta_where = st.tuples(st.just("c"), st.integers(0, 14), st.sampled_from(META_PARTS), st.integers(0, 3))
metadata_corruption = st.one_of(
    st.tuples(st.just("node"), _meta_where, st.sampled_from(_NODE_KINDS)),
    st.tuples(st.just("symlink"), _meta_where, st.sampled_from(_SYMLINK_KINDS)),
    st.tuples(st.just("truncate"), _meta_where, st.floats(0, 1)),
    st.tuples(st.just("content"), _meta_where, _hostile_bytes),
    st.tuples(st.just("json"), st.integers(0, 14), st.sampled_from(_JSON_PATHS), _json_value),
    st.tuples(st.just("mount-id"), st.integers(0, 14), _id_text),
    st.tuples(st.just("lower"), _meta_where, st.lists(_lower_entry, min_size=0, max_size=5)),
    st.tuples(st.just("link"), st.integers(0, 14), st.integers(0, 3), _link_target),
    st.tuples(st.just("swap"), st.integers(0, 14), st.integers(0, 14), st.sampled_from(META_PARTS), st.integers(0, 3)),
    st.tuples(st.just("rename"), st.integers(0, 14), _name_text),
)


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What a root shows: every entry's type, mode, owner, size, link target and content hash."""
    import hashlib

    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            extra: object = None
            if stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
                extra = st_.st_rdev
            size = 0 if stat.S_ISDIR(st_.st_mode) else st_.st_size
            out[os.path.relpath(path, root)] = (st_.st_mode, st_.st_uid, st_.st_gid, size, extra)
    return out


@settings(max_examples=DIFF_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.lists(metadata_corruption, min_size=0, max_size=4), st.sampled_from([KERNEL_RELEASE, os.uname().release]))
@example([], KERNEL_RELEASE)
@example([], os.uname().release)
def test_flat_root_equals_nested(arena: Arena, corruptions: list[tuple], release: str) -> None:
    if not (arena.indexed and _supports_layout()):
        pytest.skip("this mobynit has no flat layout")
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
                roots.append((record, _tree(a.target)))
            finally:
                _detach(a)
    finally:
        a.reset()
    (auto, auto_tree), (nested, nested_tree) = roots
    event(f"auto layout: {auto.get('layout')}")
    included = [[e["id"] for e in r["extensions"] if e["included"]] for r in (auto, nested)]
    assert included[0] == included[1]
    assert nested.get("layout") == "nested" or not included[1]  # the hostapp alone is one mount either way
    if auto_tree != nested_tree:
        only = sorted(set(auto_tree) ^ set(nested_tree))[:10]
        changed = sorted(k for k in set(auto_tree) & set(nested_tree) if auto_tree[k] != nested_tree[k])[:10]
        raise AssertionError(f"the {auto.get('layout')} root differs from the nested one: in one only {only}, "
                             f"different {changed} ({auto.get('layout_reason')})")


HOSTAPP_PARTS = ("config", "mount_id", "top_lower", "lnk", "layer_diff", "cdir", "mdir", "top", "top_diff", "layer")
_hwhere = st.tuples(st.sampled_from(HOSTAPP_PARTS), st.integers(0, 3))
hostapp_corruption = st.one_of(
    st.tuples(st.just("node"), _hwhere, st.sampled_from(["delete", "empty-file", "fifo", "huge", "whiteout"])),
    st.tuples(st.just("symlink"), _hwhere, st.sampled_from(["mirror", "decoy", "self", "loop2", "dangling", "dotdot", "etc"])),
    st.tuples(st.just("truncate"), st.sampled_from(["config"]), st.floats(0, 0.99)),
    st.tuples(st.just("content"), st.sampled_from(["mount_id", "top_lower"]),
              st.sampled_from([b"", b"..", b"../../etc", b"/etc", b"l/../../../etc", b"\xff" * 64, b"0" * 63])),
    # (each of these breaks the config; State={} or Name="x" would not)
    st.tuples(st.just("json"), st.sampled_from([("ID",), ("Config",), ("Config", "Labels"), ("State",), ("Name",)]),
              st.sampled_from([1, [1], 2.5, None])).filter(lambda c: c[2] is not None or c[1] in (("ID",), ("Config",))),
    st.tuples(st.just("current"), st.sampled_from(["delete", "dangling", "file", "dotdot", "not-hex", "loop"])),
)


class _Host:
    """The hostapp's side of the arena: the same journal, rooted at the sysroot."""

    def __init__(self, a: Arena) -> None:
        self.a = a
        stash = a.stash / "hostapp"
        stash.mkdir(exist_ok=True)
        self.journal = Journal(a.dev.sysroot, stash)

    def rel(self, part: str, k: int) -> str:
        return "balena/" + self.a.hcontainer.part(part, k)


def apply_hostapp(h: _Host, c: tuple) -> None:
    a, j = h.a, h.journal
    kind = c[0]
    if kind == "node":
        path = j.take(h.rel(*c[1]))
        if path is None or c[2] == "delete":
            return
        if c[2] == "empty-file":
            Path(path).write_bytes(b"")
        elif c[2] == "fifo":
            os.mkfifo(path)
        elif c[2] == "huge":
            with open(path, "wb") as f:
                f.truncate(HUGE)
        else:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    elif kind == "symlink":
        rel = h.rel(*c[1])
        path = j.take(rel)
        if path is None:
            return
        target = {
            "mirror": a.mirror_of(rel.removeprefix("balena/")),
            "decoy": str(a.decoy),
            "self": os.path.basename(path),
            "dangling": "nothing-here",
            "dotdot": "../" * 12 + "etc",
            "etc": "/etc",
            "loop2": os.path.basename(path) + ".loop",
        }[c[2]]
        if c[2] == "loop2":
            other = j.take(rel + ".loop")
            if other is None:
                return
            os.symlink(os.path.basename(path), other)
        os.symlink(target, path)
    elif kind in ("truncate", "content", "json"):
        rel = h.rel(c[1] if kind != "json" else "config", 0)
        path = f"{j.root}/{rel}"
        if not j.safe(rel) or not os.path.lexists(path) or not stat.S_ISREG(os.lstat(path).st_mode):
            return
        j.take(rel)
        old = j.saved_bytes() or b""
        if kind == "truncate":
            new = old[: int(len(old.rstrip()) * c[2])]
        elif kind == "content":
            new = c[2]
        else:
            try:
                new = json.dumps(_set_json(json.loads(old), c[1], c[2])).encode()
            except (ValueError, TypeError):  # an earlier corruption broke it already
                new = old
        Path(path).write_bytes(new)
    elif kind == "current":
        path = j.take("current")
        assert path is not None
        how = c[1]
        if how == "dangling":
            os.symlink("hostapps/" + "f" * 64, path)
        elif how == "file":
            Path(path).write_text(f"hostapps/{a.dev.hostapp_id}")
        elif how == "dotdot":
            os.symlink("hostapps/../../../etc", path)
        elif how == "not-hex":
            os.symlink(f"hostapps/{a.dev.hostapp_id.upper()}", path)
        elif how == "loop":
            os.symlink("current", path)
    else:
        raise AssertionError(kind)


@settings(max_examples=HOSTAPP_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(hostapp_corruption, min_size=1, max_size=3))
@example([("current", "loop")])
@example([("json", ("State",), 1)])
@example([("truncate", "config", 0.0), ("json", ("ID",), 1)])
def test_hostile_hostapp_is_one_error(arena: Arena, corruptions: list[tuple]) -> None:
    a = arena
    assert not a.broken, "an earlier example could not be undone; the copy is unusable"
    h = _Host(a)
    try:
        for c in corruptions:
            apply_hostapp(h, c)
        status, out, err = run_plan(a, DEFAULT, "--json")
        assert status == 1 and out == "", (corruptions, out, err)
        _one_error(err)
        proc, record = run_assemble(a, DEFAULT)
        try:
            assert "Traceback" not in proc.stderr, proc.stderr
            assert proc.returncode == 1 and record is None, proc.stderr
            _one_error(proc.stderr)
            assert not os.path.ismount(a.target)
            assert not mounts.mounts_under(str(a.work.parent))
        finally:
            _detach(a)
    finally:
        h.journal.undo()
        a.reset()
    assert _snapshot(a.dev.sysroot) == a.hsnapshot, f"undoing {corruptions} did not restore the sysroot"


def _one_error(stderr: str) -> None:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("mobynit: error: ")]
    assert len(errors) == 1 and lines == errors, stderr
    assert "hostapp" in errors[0] and errors[0].isprintable(), errors[0]
