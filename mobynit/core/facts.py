"""What a layer deletes or hides, recorded once so that boot never walks a layer.

One overlay of all layers (flat) means the same as the reference layout (one
overlay per container, the root an overlay of those) unless some container's
whiteouts or opaque directories reach into a container below it. Finding
those needs a walk of every layer: far too slow for boot. Layers are
immutable once committed, so `mobynit index` walks each once and writes
`overlay2/<id>/mobynit-facts.json` beside the layer's `diff/`, where it lives
and dies with the layer (the engine removes the whole directory).

The file is read like everything else in the store: O_NOFOLLOW, size-capped,
strictly validated. A missing, stale (other id) or malformed file only means
"unknown", and unknown means the safe nested layout. Facts can go stale only
if a layer is changed after it was committed (which Docker never does); the
directory ctimes recorded with them catch that cheaply for extension-sized
layers, and an extension whose facts cannot be checked is never flattened:
under nesting, an override can only replace hostapp files, and stale facts
must not let it delete them.
"""

from __future__ import annotations

import posix
import stat

from mobynit.core import jsonio
from mobynit.core.errors import StoreError, shown
from mobynit.core.fileio import read_file, write_atomic
from mobynit.core.model import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

FACTS_NAME = "mobynit-facts.json"
FACTS_VERSION = 2  # 2: directory ctimes, to tell stale facts
FACTS_LIMIT = 32 << 20
PATHS_LIMIT = 2000  # list every path only for extension-sized layers; big ones are asked by lookup
_S_IFMT, _S_IFDIR = 0o170000, 0o040000  # stat.S_IFMT(mode), S_IFDIR, without a call per directory
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."


class LayerFacts(Record):
    """Whiteout paths, opaque directories, other overlay xattrs, and (for small
    layers) every path in the layer, all relative to the layer root."""

    __slots__ = ("whiteouts", "opaques", "xattrs", "paths", "dirs")
    _defaults = {"dirs": None}
    whiteouts: tuple[str, ...]
    opaques: tuple[str, ...]
    xattrs: tuple[str, ...]  # paths carrying trusted.overlay.* other than opaque=y
    paths: frozenset[str] | None  # None when the layer is too big to list
    # (path, ctime) of the layer's root (".") and every directory, for small layers: any entry
    # created, removed or given an xattr since changes its directory's ctime, which no one
    # can set back, so load() can tell facts that went stale without walking the layer.
    dirs: tuple[tuple[str, int], ...] | None


def walk(diff: str, limit: int | None = PATHS_LIMIT) -> LayerFacts:
    """Walk one layer directory; never follows a symlink. Paths and directories
    are listed up to `limit` paths (None: always, for a walk made at boot)."""
    whiteouts: list[str] = []
    opaques: list[str] = []
    xattrs: list[str] = []
    paths: list[str] = []
    dirs: list[tuple[str, int]] = [(".", posix.lstat(diff).st_ctime_ns)]
    _check_xattrs(diff, "", opaques, xattrs)
    stack = [("", diff)]
    while stack:
        rel_dir, real_dir = stack.pop()
        with posix.scandir(real_dir) as it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                paths.append(rel)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    whiteouts.append(rel)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    continue
                _check_xattrs(entry.path, rel, opaques, xattrs)
                if stat.S_ISDIR(st.st_mode):
                    dirs.append((rel, st.st_ctime_ns))
                    stack.append((rel, entry.path))
    return LayerFacts(
        whiteouts=tuple(sorted(whiteouts)),
        opaques=tuple(sorted(opaques)),
        xattrs=tuple(sorted(xattrs)),
        paths=frozenset(paths) if limit is None or len(paths) <= limit else None,
        dirs=tuple(sorted(dirs)) if limit is None or len(paths) <= limit else None,
    )


def _check_xattrs(path: str, rel: str, opaques: list[str], xattrs: list[str]) -> None:
    try:
        names = posix.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if not name.startswith(OVERLAY_XATTR_PREFIX):
            continue
        if name == OPAQUE_XATTR and rel and _getxattr(path, name) == b"y":
            opaques.append(rel)
        else:
            xattrs.append(rel or ".")


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return posix.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def facts_path(layer_dir: str) -> str:
    return f"{layer_dir}/{FACTS_NAME}"


def to_doc(layer_id: str, facts: LayerFacts) -> dict[str, object]:
    """The document `save` writes and `load` reads."""
    return {
        "version": FACTS_VERSION,
        "id": layer_id,
        "whiteouts": list(facts.whiteouts),
        "opaques": list(facts.opaques),
        "xattrs": list(facts.xattrs),
        "paths": sorted(facts.paths) if facts.paths is not None else None,
        "dirs": [list(d) for d in facts.dirs] if facts.dirs is not None else None,
    }


def save(layer_dir: str, layer_id: str, facts: LayerFacts) -> None:
    """Write atomically and durably beside the layer's diff/; raises StoreError."""
    write_atomic(facts_path(layer_dir), jsonio.dumps(to_doc(layer_id, facts)).encode())


def _valid_path(p: object) -> bool:
    if not isinstance(p, str) or not p or "\0" in p or p.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in p.split("/"))


def all_valid_paths(values: list[object]) -> bool:
    """_valid_path of every item, in a few passes of C over one joined string:
    a layer's facts list thousands of paths, read at every boot."""
    if not values:
        return True
    try:
        joined = "\0".join(values)  # type: ignore[arg-type]
    except TypeError:  # an item that is not a string
        return False
    if joined.count("\0") != len(values) - 1:
        return False  # a NUL inside an item
    # Each item between slashes: an empty item or part, a leading or trailing slash, "." or ".." shows as one of these.
    wrapped = "/" + joined.replace("\0", "/\0/") + "/"
    return "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped


def _dirs(value: object) -> tuple[tuple[str, int], ...] | None:
    """The recorded [path, ctime] pairs as tuples; ValueError unless they are exactly that."""
    if value is None:
        return None
    if type(value) is not list:
        raise ValueError("dirs is not a list")
    out = []
    for item in value:
        if type(item) is not list or len(item) != 2 or type(item[1]) is not int:  # bool is not int here
            raise ValueError("dirs holds something other than [path, ctime] pairs")
        out.append((item[0], item[1]))
    if not all_valid_paths([p for p, _ in out if p != "."]):
        raise ValueError("dirs holds something other than [path, ctime] pairs")
    return tuple(out)


def unchanged(diff: str, dirs: Sequence[tuple[str, int]], dir_fd: int | None = None,
              diff_stat: posix.stat_result | None = None) -> bool:
    """Every recorded directory is still a directory with the recorded ctime (lstat, no symlinks).

    `diff` may be relative to `dir_fd`; `diff_stat` is its lstat when the caller already made it."""
    for rel, ctime in dirs:
        try:
            if rel != ".":
                st = posix.lstat(f"{diff}/{rel}", dir_fd=dir_fd)
            else:
                st = diff_stat if diff_stat is not None else posix.lstat(diff, dir_fd=dir_fd)
        except OSError:
            return False
        now = st.st_ctime_ns
        if st.st_mode & _S_IFMT != _S_IFDIR or (now != ctime and not _same_time(now, ctime)):
            return False
    return True


def _same_time(now: int, recorded: int) -> bool:
    """Equal, or equal to the second where the file system kept no nanoseconds
    (mkfs.ext4 -d, which makes device images, copies ctimes without them)."""
    return now == recorded or (now % 1_000_000_000 == 0 and now // 1_000_000_000 == recorded // 1_000_000_000)


def load(layer_dir: str, layer_id: str, dir_fd: int | None = None,
         diff_stat: posix.stat_result | None = None) -> LayerFacts | None:
    """The recorded facts of a layer, or None when there are none worth trusting:
    missing, malformed, for another layer, or stale (see LayerFacts.dirs).

    `layer_dir` may be relative to `dir_fd` (the store's overlay2, see
    mobynit.core.store); `diff_stat` is the lstat of its diff/ the store already made."""
    try:
        doc = jsonio.loads(read_file(facts_path(layer_dir), FACTS_LIMIT, dir_fd=dir_fd))
    except (StoreError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return from_doc(doc, layer_dir, layer_id, dir_fd, diff_stat)


def from_doc(doc: object, layer_dir: str, layer_id: str, dir_fd: int | None = None,
             diff_stat: posix.stat_result | None = None) -> LayerFacts | None:
    """A facts document as read from its file, checked the one way: current version,
    this layer's id, every type, and not stale; else None."""
    try:
        if type(doc) is not dict or doc.get("version") != FACTS_VERSION or doc.get("id") != layer_id:
            return None
        whiteouts, opaques, xattrs, paths = doc.get("whiteouts"), doc.get("opaques"), doc.get("xattrs"), doc.get("paths")
        if type(whiteouts) is not list or type(opaques) is not list or type(xattrs) is not list:
            return None
        if paths is not None and type(paths) is not list:
            return None
        # Every path of every list checked in one pass ("." may only stand in xattrs, for the layer's root).
        if not all_valid_paths([*whiteouts, *opaques, *(p for p in xattrs if p != "."), *(paths or ())]):
            return None
        dirs = _dirs(doc.get("dirs"))
        if dirs is not None and not unchanged(f"{layer_dir}/diff", dirs, dir_fd, diff_stat):
            return None
        return LayerFacts(
            whiteouts=tuple(whiteouts),
            opaques=tuple(opaques),
            xattrs=tuple(xattrs),
            paths=None if paths is None else frozenset(paths),
            dirs=dirs,
        )
    except (StoreError, ValueError, UnicodeDecodeError, RecursionError, TypeError):
        return None  # TypeError: an unhashable item in dirs' paths, say


def index(layers: Iterable[tuple[str, str]], force: bool = False) -> list[str]:
    """Record facts for each (layer id, overlay2/<id> dir) lacking them; returns the ids written."""
    written = []
    for layer_id, layer_dir in layers:
        if not force and load(layer_dir, layer_id) is not None:
            continue
        save(layer_dir, layer_id, walk(f"{layer_dir}/diff"))
        written.append(layer_id)
    return written


class Stack(Record):
    """One container's layers as the flatten check sees them, top first."""

    __slots__ = ("name", "dirs", "facts", "hostapp")
    _defaults = {"hostapp": False}
    name: str
    dirs: tuple[str, ...]  # the layers' diff directories
    facts: tuple[LayerFacts | None, ...]
    hostapp: bool  # the hostapp's big layers may keep facts that cannot be checked cheaply


def flat_conflict(stacks: Sequence[Stack]) -> str | None:
    """Why one flat overlay of these stacks (top first) would not mean what the
    nested layout means, or None when it would.

    Flat differs from nested only where a stack's whiteout or opaque directory
    names a path that a stack below it has, or where a layer carries other
    overlay xattrs (redirects, metacopy) that a nested mount would have hidden.
    """
    from mobynit.core.layers import lookup  # only plans with extensions get here

    below_paths: set[str] = set()
    below_unlisted: list[Stack] = []  # stacks too big to list: asked by lookup instead
    for s in reversed(stacks):
        for f in s.facts:
            if f is None:
                return f"{shown(s.name)}: no layer facts recorded, or they are stale (run mobynit index)"
            if f.dirs is None and not s.hostapp:
                # Too big to check for staleness: an extension's stale facts could let its
                # whiteouts reach the hostapp, so only the hostapp's are taken on trust.
                return f"{shown(s.name)}: a layer too big for its facts to be checked"
            if f.xattrs:
                return f"{shown(s.name)}: carries overlay xattrs at {shown(f.xattrs[0])}"
        for f in s.facts:
            for p in (*f.whiteouts, *f.opaques):  # type: ignore[union-attr]
                if p in below_paths or any(lookup(u.dirs, p) is not None for u in below_unlisted):
                    return f"{shown(s.name)}: deletes or hides /{shown(p)}, which a lower image has"
        listed = [f.paths for f in s.facts]  # type: ignore[union-attr]
        if all(paths is not None for paths in listed):
            for paths in listed:
                below_paths.update(paths)  # type: ignore[arg-type]
        else:
            below_unlisted.append(s)
    return None
