"""Corruptions: one named function per kind, dispatched from a table.

A corruption is a plain tuple, `(kind, *params)`, so a failing one reads as
what it did and can be pasted into @example(); `apply(a, c)` calls
`CORRUPTIONS[kind](a, *params)` (the data-store side) and `apply_hostapp(a, c)`
calls `HOSTAPP_CORRUPTIONS[kind](a, *params)` (the hostapp side). Where a
corruption names a place in the data store it takes a `where`:

    ("g", level)                      a directory of the store's chain (DATA_LEVELS; "root" is DATA/docker)
    ("c", container, part, layer)     a part of one container (arena.PARTS), `layer` picking one of its layers

Every function goes through the arena's journals, so the example's changes
can be undone, and skips (does nothing) where a path is not safe to touch.

Longer than most modules on purpose: it is a catalogue of some twenty small
functions, each with its strategy beside it, read one kind at a time. The
facts documents' builder is in facts_docs.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st

from mobynit.core.facts import FACTS_NAME
from tests.fuzz.arena import DATA_LEVELS, MARKER, PARTS, Arena, Container, Journal, real_dir
from tests.fuzz.facts_docs import FACTS_DIRS, FACTS_LISTS, HOSTAPP_FILE, LIES, _deep, facts_accepted, facts_text
from tests.harness.device import KERNEL_RELEASE

HUGE = 5 << 30  # sparse: costs nothing on disk

Where = tuple  # ("g", level) | ("c", container index, part, layer index)

# --- strategies ---------------------------------------------------------------------------------


_where_c = st.tuples(st.just("c"), st.integers(0, 14), st.sampled_from(PARTS), st.integers(0, 3))
_where_g = st.tuples(st.just("g"), st.sampled_from(sorted(DATA_LEVELS)))
_where = st.one_of(_where_c, _where_c, _where_c, _where_g)

SYMLINK_KINDS = ("mirror", "mirror-rel", "decoy", "hostapp", "etc", "self", "loop2", "dangling", "dotdot", "dev")
NODE_KINDS = ("delete", "empty-file", "dir", "fifo", "huge", "whiteout", "zero-dev")

_hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../..", "/", "/etc", "\n", "a\nb", "\x1b[31mred", "\udcff", "\x00", "l/..", "", " ", "-init"]),
)
_hostile_bytes = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\xff\xfe", b"..", b"../../../../etc", b"/etc", b"\x00", b"\n" * 3, b"\xc3\x28"]),
)


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _hostile_text,
    st.sampled_from(["overlay", "1", "true", "/name", "0" * 64]),
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_hostile_text, inner, max_size=3)),
    max_leaves=8,
)
JSON_PATHS = (
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
_payload = st.one_of(st.sampled_from(NODE_KINDS[1:] + SYMLINK_KINDS), _release_text)

PLANT_PATHS = (HOSTAPP_FILE, "usr/share/hostapp", "usr/share", "etc/hostapp-file", "etc",
               "bin/busybox", "a\nb", "\x1b[2J", "usr/share/hostapp/\udcff")


corruption = st.one_of(
    st.tuples(st.just("node"), _where, st.sampled_from(NODE_KINDS)),
    st.tuples(st.just("symlink"), _where, st.sampled_from(SYMLINK_KINDS)),
    st.tuples(st.just("truncate"), _where_c, st.floats(0, 1)),
    st.tuples(st.just("garble"), _where_c, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("content"), _where_c, _hostile_bytes),
    st.tuples(st.just("json"), st.integers(0, 14), st.sampled_from(JSON_PATHS), _json_value),
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
    st.tuples(st.just("facts"), st.one_of(st.integers(0, 14), st.just("hostapp")), st.integers(0, 3),
              st.sampled_from(FACTS_LISTS), st.sampled_from(FACTS_DIRS), _hostile_text),
    st.tuples(st.just("release"), st.integers(0, 14), st.integers(0, 3),
              st.sampled_from(["own", "other", "a\nb", "\udcff", "..", "*"]), _payload, st.booleans()),
    st.tuples(st.just("os-release"), st.sampled_from(["etc/os-release", "usr/lib/os-release"]), _payload),
    st.tuples(st.just("modules"), st.integers(0, 3), st.sampled_from(["lib", "lib/modules", f"lib/modules/{KERNEL_RELEASE}",
              f"lib/modules/{KERNEL_RELEASE}/Module.symvers"]), st.sampled_from(NODE_KINDS + SYMLINK_KINDS)),
)

# --- helpers -------------------------------------------------------------------------------------


def _container(a: Arena, i: int) -> Container:
    return a.containers[i % len(a.containers)]


def _target(a: Arena, where: Where) -> tuple[Journal, str, str]:
    """(journal, path relative to its root, the same place in the mirror) for a `where`."""
    if where[0] == "g":
        rel = DATA_LEVELS[where[1]]
        if not rel:  # the store root itself: changed from the data partition
            return a.djournal, a.store.name, str(a.mirror)
        return a.journal, rel, a.mirror_of(rel)
    _, i, part, k = where
    rel = _container(a, i).part(part, k)
    return a.journal, rel, a.mirror_of(rel)


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


def make_node(journal: Journal, rel: str, kind: str) -> None:
    """Replace `rel` by nothing (delete) or by a node of this kind."""
    path = journal.take(rel)
    if path is None or kind == "delete":
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


def make_symlink(a: Arena, journal: Journal, rel: str, kind: str, mirror: str) -> None:
    """Replace `rel` by a symlink of this kind; `mirror` is the same place in a mirror store."""
    path = journal.take(rel)
    if path is None:
        return
    parent = os.path.dirname(path)
    target = {
        "mirror": mirror,
        "mirror-rel": os.path.relpath(mirror, parent),
        "decoy": str(a.decoy),
        "hostapp": str(a.hstore / a.hcontainer.part("layer", 1)),
        "etc": "/etc",
        "self": os.path.basename(path),
        "dangling": "no-such-thing",
        "dotdot": "../" * 12 + "etc",
        "dev": "/dev/zero",
    }.get(kind)
    if kind == "loop2":
        other_path = journal.take(rel + ".loop")
        if other_path is None:
            return
        os.symlink(os.path.basename(path), other_path)
        target = os.path.basename(other_path)
    assert target is not None, kind
    os.symlink(target, path)


def _put(a: Arena, journal: Journal, rel: str, payload: str | bytes) -> None:
    """A file with these bytes, or a node or symlink of this kind, at `rel`, creating its directories."""
    if not _ensure_parents(journal, rel):
        return
    if isinstance(payload, bytes):
        path = journal.take(rel)
        if path is not None:
            Path(path).write_bytes(payload)
    elif payload in NODE_KINDS:
        make_node(journal, rel, payload)
    else:
        make_symlink(a, journal, rel, payload, a.mirror_of(rel))


def _copy(src: str, dest: str) -> None:
    """cp -a: keeps whiteout devices, opaque xattrs and symlinks as they are."""
    subprocess.run(["cp", "-a", "--no-dereference", src, dest], check=True)


def _write(journal: Journal, rel: str, data: bytes) -> None:
    path = journal.take(rel)
    if path is not None:
        Path(path).write_bytes(data)


def _rewrite(journal: Journal, rel: str, change: Callable[[bytes], bytes]) -> None:
    """Replace a regular file with change(its bytes); leaves anything else alone."""
    if not journal.regular(rel) or journal.take(rel) is None:
        return
    old = journal.saved_bytes() or b""
    Path(journal.root, rel).write_bytes(change(old))


def _config_doc(a: Arena, i: int) -> tuple[str, dict] | None:
    rel = _container(a, i).config
    if not a.journal.regular(rel):
        return None
    try:
        doc = json.loads(Path(a.store, rel).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return (rel, doc) if isinstance(doc, dict) else None


def set_json(doc: dict, path: tuple, value: object) -> object:
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


def _forget_facts(a: Arena, c: Container, k: int) -> None:
    """Remove the facts `mobynit index` recorded for a layer whose contents were just changed.

    Left in place they are stale, and a reader that trusts them never looks at the change
    (which is the point of some examples, and defeats others).
    """
    a.journal.take(c.part("layer_facts", k))


# --- the data store's corruptions ------------------------------------------------------------


def node(a: Arena, where: Where, kind: str) -> None:
    journal, rel, _ = _target(a, where)
    make_node(journal, rel, kind)


def symlink(a: Arena, where: Where, kind: str) -> None:
    journal, rel, mirror = _target(a, where)
    make_symlink(a, journal, rel, kind, mirror)


def truncate(a: Arena, where: Where, fraction: float) -> None:
    journal, rel, _ = _target(a, where)
    _rewrite(journal, rel, lambda b: b[: int(len(b.rstrip()) * fraction)])


def garble(a: Arena, where: Where, changes: list[tuple[int, int]]) -> None:
    def change(b: bytes) -> bytes:
        data = bytearray(b)
        for pos, val in changes:
            if data:
                data[pos % len(data)] = val
        return bytes(data)

    journal, rel, _ = _target(a, where)
    _rewrite(journal, rel, change)


def content(a: Arena, where: Where, data: bytes) -> None:
    journal, rel, _ = _target(a, where)
    _write(journal, rel, data)


def json_set(a: Arena, i: int, path: tuple, value: object) -> None:
    """config.v2.json with `value` at `path` (a wrong type, a hostile string, ...)."""
    found = _config_doc(a, i)
    if found is not None:
        rel, doc = found
        _write(a.journal, rel, json.dumps(set_json(doc, path, value)).encode("utf-8", "surrogatepass"))


def json_deep(a: Arena, i: int, depth: int) -> None:
    """config.v2.json of an extension, with `depth` nested arrays appended."""
    found = _config_doc(a, i)
    if found is not None:
        rel, doc = found
        set_json(doc, ("Config", "Labels"), {MARKER: "overlay"})
        _write(a.journal, rel, (json.dumps(doc)[:-1] + f', "Deep": {_deep(depth)}}}').encode("utf-8", "surrogatepass"))


def json_raw(a: Arena, i: int, value: object) -> None:
    """config.v2.json replaced by some JSON that mentions the extension label."""
    found = _config_doc(a, i)
    if found is not None:
        _write(a.journal, found[0], json.dumps({"marker": MARKER, "doc": value}).encode("utf-8", "surrogatepass"))


def mount_id(a: Arena, i: int, text: str) -> None:
    c, other = _container(a, i), _container(a, i + 1)
    value = {
        "other-mount-id": other.mount_id,
        "other-layer-id": c.layers[-1],
        "init": c.mount_id + "-init",
        "upper": c.mount_id.upper(),
        "mirror": str(a.mirror / "overlay2" / c.mount_id),
        "63hex": c.mount_id[:63],
        "newline": c.mount_id + "\n\n",
    }.get(text, text)
    _write(a.journal, c.part("mount_id", 0), os.fsencode(value))


def lower(a: Arena, where: Where, entries: list[str]) -> None:
    """A `lower` file (the given one, or the container's top layer's) listing these entries."""
    c = _container(a, where[1])
    rel = _target(a, where)[1]

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

    _write(a.journal, rel if rel.endswith("/lower") else c.part("top_lower", 0), os.fsencode(":".join(map(one, entries))))


def link(a: Arena, i: int, k: int, text: str) -> None:
    """The container's `l/<LINK>` of layer k retargeted."""
    c = _container(a, i)
    lid = c.layer_id(k)
    other = a.all_layers[(k + 3) % len(a.all_layers)]
    lnk = c.links[k % len(c.links)]
    target: str | bytes = {
        "abs-mirror": str(a.mirror / "overlay2" / lid / "diff"),
        "escape": f"../../../../../../{a.mirror.relative_to('/')}/overlay2/{lid}/diff",
        "other": f"../{other}/diff",
        "init": f"../{c.mount_id}-init/diff",
        "diff-dotdot": f"../{lid}/diff/..",
        "diff-dotdot-diff": f"../{lid}/diff/../diff",
        "self": lnk,
        "via-l": f"../l/{lnk}",
        "two-ids": f"../{lid}/../{other}/diff",
        "trailing-slash": f"../{lid}/diff/",
        "no-diff": f"../{lid}",
        "mirror-rel": os.path.relpath(a.mirror / "overlay2" / lid / "diff", a.store / "overlay2/l"),
        "bytes": b"../\xff\xfe/diff",
    }.get(text, text)
    if not target or (b"\x00" if isinstance(target, bytes) else "\x00") in target:
        return  # symlink(2) takes neither
    path = a.journal.take(c.part("lnk", k))
    if path is not None:
        os.symlink(target, os.fsencode(path) if isinstance(target, bytes) else path)


def swap(a: Arena, i: int, j: int, part: str, k: int) -> None:
    """The same part of two containers exchanged."""
    x, y = _container(a, i).part(part, k), _container(a, j).part(part, k)
    if x == y or x.startswith(y + "/") or y.startswith(x + "/"):
        return
    if not all(a.journal.safe(r) and os.path.lexists(f"{a.store}/{r}") for r in (x, y)):
        return
    a.journal.take(x)
    a.journal.take(y)
    (_, saved_y), (_, saved_x) = a.log.entries[-1], a.log.entries[-2]
    assert saved_x is not None and saved_y is not None
    _copy(saved_y, f"{a.store}/{x}")
    _copy(saved_x, f"{a.store}/{y}")


def rename(a: Arena, i: int, name: str) -> None:
    """A container's directory under another name."""
    c = _container(a, i)
    new = f"containers/{name}"
    if new == c.cdir or "/" in name or name in (".", ".."):
        return
    if not (a.journal.safe(c.cdir) and os.path.lexists(f"{a.store}/{c.cdir}")):
        return
    if a.journal.take(new) is None or a.journal.take(c.cdir) is None:
        return
    saved = a.log.entries[-1][1]
    assert saved is not None
    _copy(saved, f"{a.store}/{new}")


def new_container(a: Arena, name: str, how: str) -> None:
    """A new entry under containers/: an extension's config, a symlink, a FIFO, a file, a deep config."""
    if "/" in name or name in (".", ".."):
        return
    path = a.journal.take(f"containers/{name}")
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


def plant(a: Arena, i: int, k: int, where: str, how: str, forget: bool = False) -> None:
    """A whiteout, an opaque directory, a file or an outward symlink at `where` in a layer of
    container i; `forget` also removes that layer's recorded facts (else they are stale)."""
    c = _container(a, i)
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
    if forget:
        _forget_facts(a, c, k)


def facts(a: Arena, owner: int | str, k: int, lists: str, dirs: str, text: str) -> None:
    """Layer k of container `owner` (or of the hostapp) given a facts document (see facts_text).

    A lie the reader must accept (a truthful-looking document whose lists are not the
    layer's truth, with ctimes that check out or, for the hostapp, none) marks the arena
    `forged`: flat may then legitimately let a whiteout through, see checks.check_assembled.
    """
    if owner == "hostapp":
        journal, layer, side = a.hjournal, f"{a.hstore.name}/{a.hcontainer.part('layer', k)}", "hostapp"
        lid = a.hcontainer.layer_id(k)
    else:
        c = _container(a, int(owner))
        journal, layer, side = a.journal, c.part("layer", k), "extension"
        lid = c.layer_id(k)
    diff = f"{layer}/diff"
    if not (journal.safe(diff) and real_dir(f"{journal.root}/{diff}")):
        return
    data = facts_text(f"{journal.root}/{diff}", lid, lists, dirs, text)
    _write(journal, f"{layer}/{FACTS_NAME}", data)
    accepted = facts_accepted(lists, dirs, text)
    event(f"facts on {side}'s layer: {lists}, dirs {dirs}: {'accepted' if accepted else 'refused'}")
    if accepted and lists in LIES and (dirs == "correct" or side == "hostapp"):
        a.forged = True


def release(a: Arena, i: int, k: int, name: str, payload: str | bytes, forget: bool = False) -> None:
    """systemd-sysext's extension-release file, which a compatibility gate reads, in a layer of container i."""
    i %= len(a.containers)
    name = {"own": a.names[i], "other": a.names[(i + 1) % len(a.names)]}.get(name, name)
    rel = f"{a.containers[i].part('layer_diff', k)}/usr/lib/extension-release.d/extension-release.{name}"
    _put(a, a.journal, rel, payload)
    if forget:
        _forget_facts(a, a.containers[i], k)


def os_release(a: Arena, rel: str, payload: str | bytes) -> None:
    """The hostapp's os-release: unreadable or garbled, it must not stop a boot."""
    _put(a, a.hjournal, f"{a.hstore.name}/{a.hcontainer.part('layer_diff', -1)}/{rel}", payload)


def modules(a: Arena, k: int, rel: str, kind: str) -> None:
    """ext-abi's lib/modules tree (in its top layer, or in a lower one) replaced by a node or symlink."""
    abi = a.containers[sorted(a.pristine.extensions).index("ext-abi")]
    rel = f"{abi.part('layer_diff', 1)}/{rel}" if k % 2 else f"{abi.part('top_diff', 0)}/{rel}"
    if kind in NODE_KINDS:
        make_node(a.journal, rel, kind)
    else:
        make_symlink(a, a.journal, rel, kind, a.mirror_of(rel))


CORRUPTIONS: dict[str, Callable[..., None]] = {
    "node": node,
    "symlink": symlink,
    "truncate": truncate,
    "garble": garble,
    "content": content,
    "json": json_set,
    "json-deep": json_deep,
    "json-raw": json_raw,
    "mount-id": mount_id,
    "lower": lower,
    "link": link,
    "swap": swap,
    "rename": rename,
    "new-container": new_container,
    "plant": plant,
    "facts": facts,
    "release": release,
    "os-release": os_release,
    "modules": modules,
}


def apply(a: Arena, c: tuple) -> None:
    CORRUPTIONS[c[0]](a, *c[1:])


# --- the hostapp's corruptions: each one always breaks the hostapp ---------------------------

HOSTAPP_PARTS = ("config", "mount_id", "top_lower", "lnk", "layer_diff", "cdir", "mdir", "top", "top_diff", "layer")
_hwhere = st.tuples(st.sampled_from(HOSTAPP_PARTS), st.integers(0, 3))
HOSTAPP_NODE_KINDS = ("delete", "empty-file", "fifo", "huge", "whiteout")
HOSTAPP_SYMLINK_KINDS = ("mirror", "decoy", "self", "loop2", "dangling", "dotdot", "etc")
# SYSROOT/balena itself
STORE_KINDS = ("delete", "empty-file", "dir", "fifo", "zero-dev", "decoy", "self", "loop2", "dangling", "dotdot", "etc",
               "mirror")

hostapp_corruption = st.one_of(
    st.tuples(st.just("node"), _hwhere, st.sampled_from(HOSTAPP_NODE_KINDS)),
    st.tuples(st.just("symlink"), _hwhere, st.sampled_from(HOSTAPP_SYMLINK_KINDS)),
    st.tuples(st.just("truncate"), st.sampled_from(["config"]), st.floats(0, 0.99)),
    st.tuples(st.just("content"), st.sampled_from(["mount_id", "top_lower"]),
              st.sampled_from([b"", b"..", b"../../etc", b"/etc", b"l/../../../etc", b"\xff" * 64, b"0" * 63])),
    # (each of these breaks the config; State={} or Name="x" would not)
    st.tuples(st.just("json"), st.sampled_from([("ID",), ("Config",), ("Config", "Labels"), ("State",), ("Name",)]),
              st.sampled_from([1, [1], 2.5, None])).filter(lambda c: c[2] is not None or c[1] in (("ID",), ("Config",))),
    st.tuples(st.just("current"), st.sampled_from(["delete", "dangling", "file", "dotdot", "not-hex", "loop"])),
    st.tuples(st.just("store"), st.sampled_from(STORE_KINDS)),
)


def _hpart(a: Arena, part: str, k: int) -> str:
    """A part of the hostapp container, relative to its store. A layer's directory is
    one of its image layers: the -init layer (lower's first entry) is never mounted, so
    boot does not look at it and breaking it breaks nothing (its `l/` link is still read)."""
    if part in ("layer", "layer_diff"):
        k = 1 + k % (len(a.hcontainer.layers) - 1)
    return a.hcontainer.part(part, k)


def _hrel(a: Arena, part: str, k: int) -> str:
    """A part of the hostapp container, relative to the sysroot."""
    return f"{a.hstore.name}/{_hpart(a, part, k)}"


def host_node(a: Arena, where: tuple[str, int], kind: str) -> None:
    make_node(a.hjournal, _hrel(a, *where), kind)


def host_symlink(a: Arena, where: tuple[str, int], kind: str) -> None:
    make_symlink(a, a.hjournal, _hrel(a, *where), kind, str(a.hmirror / _hpart(a, *where)))


def host_truncate(a: Arena, part: str, fraction: float) -> None:
    _rewrite(a.hjournal, _hrel(a, part, 0), lambda b: b[: int(len(b.rstrip()) * fraction)])


def host_content(a: Arena, part: str, data: bytes) -> None:
    if a.hjournal.regular(_hrel(a, part, 0)):
        _write(a.hjournal, _hrel(a, part, 0), data)


def host_json(a: Arena, path: tuple, value: object) -> None:
    def change(old: bytes) -> bytes:
        try:
            return json.dumps(set_json(json.loads(old), path, value)).encode()
        except (ValueError, TypeError):  # an earlier corruption broke it already
            return old

    _rewrite(a.hjournal, _hrel(a, "config", 0), change)


def host_current(a: Arena, how: str) -> None:
    """SYSROOT/current, the symlink naming the hostapp, missing or wrong."""
    path = a.hjournal.take("current")
    assert path is not None
    hid = a.dev.hostapp_id
    if how == "dangling":
        os.symlink("hostapps/" + "f" * 64, path)
    elif how == "file":
        Path(path).write_text(f"hostapps/{hid}")
    elif how == "dotdot":
        os.symlink("hostapps/../../../etc", path)
    elif how == "not-hex":
        os.symlink(f"hostapps/{hid.upper()}", path)
    elif how == "loop":
        os.symlink("current", path)


def host_store(a: Arena, kind: str) -> None:
    """SYSROOT/balena, the hostapp store's root, replaced by a node or a symlink."""
    if kind in NODE_KINDS:
        make_node(a.hjournal, a.hstore.name, kind)
    else:
        make_symlink(a, a.hjournal, a.hstore.name, kind, str(a.hmirror))


HOSTAPP_CORRUPTIONS: dict[str, Callable[..., None]] = {
    "node": host_node,
    "symlink": host_symlink,
    "truncate": host_truncate,
    "content": host_content,
    "json": host_json,
    "current": host_current,
    "store": host_store,
}


def apply_hostapp(a: Arena, c: tuple) -> None:
    HOSTAPP_CORRUPTIONS[c[0]](a, *c[1:])
