"""Reading a Docker-format overlay2 data-root, trusting nothing in it.

Every name that comes from the store is checked before it becomes part of a
path: container and layer ids must be 64 hex digits, `l/` links must be 26
characters and point at `../<id>/diff`, and directories are looked at with
lstat so that a symlink planted in the store never leads outside it. Files
are opened with O_NOFOLLOW and must be regular. Whatever is wrong raises
StoreError naming the file; the caller decides whether that sinks a boot
(the hostapp) or one extension.
"""

from __future__ import annotations

import posix
import time

from mobynit.core import jsonio
from mobynit.core import labels as label
from mobynit.core.errors import StoreError
from mobynit.core.errors import shown as printable
from mobynit.core.facts import LayerFacts
from mobynit.core.facts import load as load_facts
from mobynit.core.fileio import O_DIR, check_dir, read_file, read_text, readlink, require_dir
from mobynit.core.model import Container, Extension, KernelModules, Layer
from mobynit.core.paths import dirname

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

HEX = frozenset("0123456789abcdef")
LINK_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
LINK_LEN = 26
CONFIG_LIMIT = 4 << 20  # a config.v2.json is a few KiB; refuse to slurp a planted giant
SMALL_LIMIT = 4096  # mount-id, lower
PROBE = 16  # containers a scan reads before it judges whether sharing the rest out pays
WORTH = 0.006  # seconds of reading each process must get for a fork to pay (docs/benchmark.md)
MOUNTS = "image/overlay2/layerdb/mounts"
_S_IFMT, _S_IFDIR = 0o170000, 0o040000  # stat.S_IFMT(mode), stat.S_IFDIR, without a call


def is_id(name: str) -> bool:
    return len(name) == 64 and HEX.issuperset(name)


def _is_link(name: str) -> bool:
    return len(name) == LINK_LEN and LINK_CHARS.issuperset(name)


def _dir_at(dir_fd: int, name: str, device: int, parent: str) -> posix.stat_result:
    """require_dir for `name` below the open directory `parent`, its message built only
    when it fails: this runs a few times per container, on every boot."""
    try:
        st = posix.lstat(name, dir_fd=dir_fd)
        if st.st_mode & _S_IFMT == _S_IFDIR and st.st_dev == device:
            return st
    except OSError:
        pass
    require_dir(name, device, dir_fd=dir_fd, display=f"{parent}/{name}")  # raises, naming the rule broken
    raise StoreError(f"{parent}/{name}: changed while being read")


def _dir_has_entries(path: str) -> bool:
    with posix.scandir(path) as it:
        return next(it, None) is not None


def _parse_config(raw: bytes, path: str, cid: str) -> tuple[str, dict[str, str], str | None]:
    """(name, labels, state) from config.v2.json, with every type checked."""
    try:
        doc = jsonio.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; absurd nesting recurses
        raise StoreError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{path}: not a JSON object")
    if doc.get("ID") != cid:
        raise StoreError(f"{path}: ID {str(doc.get('ID'))[:80]!r} does not match its directory {cid}")
    driver = doc.get("Driver", "overlay2")
    if driver != "overlay2":
        raise StoreError(f"{path}: storage driver {str(driver)[:40]!r}, only overlay2 is supported")
    name = doc.get("Name", "")
    if not isinstance(name, str):
        raise StoreError(f"{path}: Name is not a string")
    config = doc.get("Config")
    if not isinstance(config, dict):
        raise StoreError(f"{path}: Config is not an object")
    labels = config.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise StoreError(f"{path}: Config.Labels is not a map of strings")
    state = doc.get("State") or {}
    if not isinstance(state, dict):
        raise StoreError(f"{path}: State is not an object")
    flags = []
    for key in ("Dead", "RemovalInProgress"):
        value = state.get(key, False)
        if not isinstance(value, bool):
            raise StoreError(f"{path}: State.{key} is not a boolean")
        if value:
            flags.append(key)
    return name.removeprefix("/"), labels, (flags[0] if flags else None)


class Store:
    """One overlay2 data-root (`/balena` on the root partition, `/docker` on data).

    Everything read from it is reached through real directories on one file
    system: the partition's (`top`, by default the directory holding the
    store, which the operator named) down to each layer directory, every
    level checked to be a directory, not a symlink, on the same device. A
    symlink or a mount anywhere on the way is refused, so nothing outside
    the partition is ever read or mounted from it.

    The store's own directories (containers, the layerdb's mounts, overlay2,
    overlay2/l) are opened once, level by level, each relative to the one
    above with O_NOFOLLOW and checked by fstat; everything below them is
    looked up relative to those descriptors (one short path per call, not
    the partition's whole path), each level checked once. The descriptors
    live as long as one public call (container, layers, scan).
    """

    __slots__ = ("root", "top", "containers", "mounts", "overlay2", "_device", "_fds", "_users", "_diffs", "_facts")

    def __init__(self, root: str, top: str | None = None) -> None:
        self.root = root.rstrip("/") or "/"
        self.top = (top.rstrip("/") or "/") if top is not None else (dirname(self.root) or "/")
        self.containers = f"{self.root}/containers"
        self.mounts = f"{self.root}/image/overlay2/layerdb/mounts"
        self.overlay2 = f"{self.root}/overlay2"
        self._device: int | None = None
        self._fds: dict[str, int] = {}  # "" (the root) and the store's directories, by path below the root
        self._users = 0
        self._diffs: dict[str, posix.stat_result] = {}  # layer id -> lstat of its checked diff/
        self._facts: dict[str, LayerFacts | None] = {}

    def device(self) -> int:
        """The partition's device; on first use, the levels between it and the
        store root are checked to be real directories on it (the root, by _fd)."""
        if self._device is None:
            try:
                device = posix.stat(self.top).st_dev  # the operator's own path: followed
            except OSError as e:
                raise StoreError(f"{self.top}: {e.strerror}") from None
            path = self.top
            below = self.root[len(self.top):] if self.root.startswith(self.top.rstrip("/") + "/") else ""
            for part in below.strip("/").split("/")[:-1] if below.strip("/") else ():
                path = f"{path.rstrip('/')}/{part}"
                require_dir(path, device)
            self._device = device  # the root itself is checked as it is opened (_fd)
        return self._device

    def _fd(self, rel: str, missing_ok: bool = False) -> int:
        """The descriptor of the store's directory `rel` ("" for the root), each
        level opened from the one above without following a symlink and checked
        to be a directory on the partition; -1 if it is missing and `missing_ok`."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        device = self.device()
        if not rel:
            # The root was checked level by level from `top` by device(); it is `top` itself
            # only when the operator named it so, and then it is followed like `top`.
            flags = O_DIR & ~posix.O_NOFOLLOW if self.root == self.top else O_DIR
            parent, name, shown = None, self.root, self.root
        else:
            parent_rel, _, name = rel.rpartition("/")
            parent = self._fd(parent_rel)
            flags, shown = O_DIR, f"{self.root}/{rel}"
        try:
            fd = posix.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            if missing_ok:
                return -1
            raise StoreError(f"{shown}: missing") from None
        except OSError as e:
            # ELOOP, ENOTDIR: let lstat say which (a symlink, a file, ...), as every level is said.
            require_dir(name, device, dir_fd=parent, display=shown)
            raise StoreError(f"{shown}: cannot open the directory: {e.strerror}") from None
        try:
            check_dir(posix.fstat(fd), shown, device)
        except (StoreError, OSError):
            posix.close(fd)
            raise
        self._fds[rel] = fd  # only once checked: later calls trust it
        return fd

    def _enter(self) -> None:
        self._users += 1

    def _leave(self) -> None:
        self._users -= 1
        if not self._users:
            fds, self._fds = self._fds, {}
            for fd in fds.values():
                posix.close(fd)

    def container(self, cid: str) -> Container:
        """The container `cid` with its layer stack; raises StoreError."""
        if not is_id(cid):
            raise StoreError(f"{self.containers}/{cid[:80]!r}: container id is not 64 hex digits")
        self._enter()
        try:
            fd = self._fd("containers")
            device = self.device()
            _dir_at(fd, cid, device, self.containers)
            path = f"{self.containers}/{cid}/config.v2.json"
            raw = read_file(f"{cid}/config.v2.json", CONFIG_LIMIT, dir_fd=fd, display=path, device=device)
            return self._load(cid, path, _parse_config(raw, path, cid))
        finally:
            self._leave()

    def _load(self, cid: str, path: str, parsed: tuple[str, dict[str, str], str | None]) -> Container:
        name, labels, state = parsed
        return Container(
            id=cid,
            name=name,
            labels=labels,
            state=state,
            layers=self._layers(cid),  # container() and scan() hold the descriptors
            overlay2=self.overlay2,
            config=path,
        )

    def layers(self, cid: str) -> tuple[Layer, ...]:
        """The read-only stack of container `cid`, top first, without its -init layer."""
        self._enter()
        try:
            return self._layers(cid)
        finally:
            self._leave()

    def _layers(self, cid: str) -> tuple[Layer, ...]:
        device = self.device()
        mounts = self._fd(MOUNTS)
        _dir_at(mounts, cid, device, self.mounts)
        mount_id_path = f"{self.mounts}/{cid}/mount-id"
        mount_id = read_text(f"{cid}/mount-id", SMALL_LIMIT, dir_fd=mounts, display=mount_id_path, device=device)
        if not is_id(mount_id):
            raise StoreError(f"{mount_id_path}: {mount_id[:80]!r} is not a 64-hex layer id")
        overlay2 = self._fd("overlay2")
        self._diff(mount_id)
        stack: list[Layer] = []
        top_diff = f"{self.overlay2}/{mount_id}/diff"
        if _dir_has_entries(top_diff):
            stack.append(Layer(id=mount_id, path=top_diff, link=f"{mount_id}/diff", facts=self._layer_facts(mount_id)))
        lower_path = f"{self.overlay2}/{mount_id}/lower"
        lower = read_text(f"{mount_id}/lower", 64 << 10, dir_fd=overlay2, display=lower_path, device=device)
        if not lower:
            raise StoreError(f"{lower_path}: empty")
        seen = {mount_id}
        init_id = f"{mount_id}-init"
        for entry in lower.split(":"):
            lid, link = self._resolve(entry, lower_path)
            if lid in seen:
                raise StoreError(f"{lower_path}: lists layer {lid} twice")
            seen.add(lid)
            if lid != init_id:  # never mounted nor read: not looked at either
                self._diff(lid)
                stack.append(Layer(id=lid, path=f"{self.overlay2}/{lid}/diff", link=link, facts=self._layer_facts(lid)))
        if not stack:
            raise StoreError(f"{lower_path}: no image layers below the -init layer")
        return tuple(stack)

    def _diff(self, lid: str) -> posix.stat_result:
        """`overlay2/<lid>` and its `diff/`, each a real directory on the partition; checked once per layer."""
        st = self._diffs.get(lid)
        if st is None:
            device, overlay2 = self.device(), self._fd("overlay2")
            _dir_at(overlay2, lid, device, self.overlay2)
            st = self._diffs[lid] = _dir_at(overlay2, f"{lid}/diff", device, self.overlay2)
        return st

    def _layer_facts(self, lid: str) -> LayerFacts | None:
        """The layer's recorded facts (mobynit.core.facts), read once per layer; its diff/ is not stat'ed again."""
        if lid not in self._facts:
            self._facts[lid] = load_facts(lid, lid, dir_fd=self._fd("overlay2"), diff_stat=self._diffs[lid])
        return self._facts[lid]

    def _resolve(self, entry: str, lower_path: str) -> tuple[str, str]:
        """(layer id, `l/<LINK>`) of one entry of a lower file, checked to land on `<id>/diff`."""
        head, _, link = entry.partition("/")
        if head != "l" or not _is_link(link):
            raise StoreError(f"{lower_path}: entry {entry[:80]!r} is not of the form l/<26 letters or digits>")
        link_path = f"{self.overlay2}/l/{link}"  # the kernel resolves l/<LINK> through a checked l/ too
        target = readlink(link, f"missing (listed in {lower_path})", dir_fd=self._fd("overlay2/l"), display=link_path)
        dots, _, rest = target.partition("/")
        lid, _, diff = rest.partition("/")
        lid_ok = is_id(lid) or (lid.endswith("-init") and is_id(lid[:-5]))
        if dots != ".." or diff != "diff" or not lid_ok:
            raise StoreError(f"{link_path}: points to {target[:120]!r}, not ../<layer id>/diff")
        return lid, f"l/{link}"

    def scan(self, wanted: Callable[[Mapping[str, str]], bool], release: str,
             processes: int | None = None) -> list[Extension]:
        """Every container whose labels make it `wanted`, each read on its own;
        a store of many containers is read by up to `processes` processes
        (default: one per CPU; see _read_all), with the same result.

        A container that cannot be read but looks like an extension comes back
        with a `fault`; one that is plainly an application is not returned.
        A store or `containers` that is missing is an empty store (nothing
        installed yet); one that cannot be read (`docker` a file, a directory
        the file system reports damaged) raises StoreError, so that it is said.
        """
        if not _present(self.root):
            return []  # nothing installed yet
        self._enter()
        try:
            fd = self._fd("containers", missing_ok=True)  # the store root first: a real directory on the partition
            if fd < 0:
                return []
            try:
                with posix.scandir(fd) as entries:
                    names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
            except OSError as e:
                raise StoreError(f"{self.containers}: cannot read: {e.strerror}") from None

            def read(entry: tuple[str, bool]) -> Extension | None:
                return self._scan_one(fd, entry[0], entry[1], wanted, release)

            found = _read_all(read, names, processes)
            return [ext for ext in found if ext is not None]
        finally:
            self._leave()

    def _scan_one(
        self, fd: int, name: str, is_dir: bool, wanted: Callable[[Mapping[str, str]], bool], release: str
    ) -> Extension | None:
        # Most containers are applications: decide that with as little work as possible,
        # and build the strings a fault needs only when there is one.
        if is_dir:
            try:
                raw = read_file(f"{name}/config.v2.json", CONFIG_LIMIT, dir_fd=fd, base=self.containers,
                                device=self._device)  # set: the descriptor `fd` was opened through device()
            except StoreError as e:
                return Extension(id=name, name=_short(name), container=None, modules=None, fault=str(e))
            # Both markers start with "io.balena.": most applications carry neither, found in one search.
            if _MARKER_HEAD not in raw or (label.MARKERS[0] not in raw and label.MARKERS[1] not in raw):
                return None  # plainly not an extension
        if not is_dir:
            shown = f"{self.containers}/{printable(name)}"  # a planted name must not forge console lines
            return Extension(id=name, name=_short(name), container=None, modules=None,
                             fault=f"{shown}: not a directory, not followed")
        if not is_id(name):
            shown = f"{self.containers}/{printable(name)}"
            return Extension(id=name, name=_best_name(raw) or _short(name), container=None, modules=None,
                             fault=f"{shown}: directory name is not a 64-hex container id")
        path = f"{self.containers}/{name}/config.v2.json"  # a 64-hex name prints as it is
        try:
            parsed = _parse_config(raw, path, name)
            cname, labels, _ = parsed
            if not wanted(labels):
                return None
            container = self._load(name, path, parsed)  # inside scan's call: its descriptors
            layers = container.layers
            dirs = [layer.path for layer in layers]
            known = [layer.facts for layer in layers]
            probe_modules, read_extension_release = _layer_lookups()
            modules = probe_modules(dirs, release, known)
            release_file = read_extension_release(dirs, cname, known)
        except StoreError as e:
            return Extension(id=name, name=_best_name(raw) or _short(name), container=None, modules=None, fault=str(e))
        release_name, ext_release = release_file if release_file is not None else (None, None)
        return Extension(
            id=name, name=cname, container=container, modules=modules, fault=None, release=ext_release,
            release_name=release_name,
        )


def _read_all(read: Callable[[tuple[str, bool]], Extension | None], names: Sequence[tuple[str, bool]],
              processes: int | None) -> list[Extension | None]:
    """read(name) for every name, in order: the first few here, timed; the rest shared
    out among the CPUs (mobynit.core.fanout) when that pays, by `shares`."""
    probe = max(PROBE, len(names) // 16)
    if len(names) <= probe:
        return [read(entry) for entry in names]
    found, spans = [], []
    start = time.perf_counter()
    for entry in names[:probe]:
        found.append(read(entry))
        now = time.perf_counter()
        spans.append(now - start)
        start = now
    rest = names[probe:]
    n = shares(spans, len(rest), _cpus() if processes is None else processes, WORTH)
    if n < 2:
        found.extend(read(entry) for entry in rest)
    else:
        from mobynit.core import fanout  # loaded only by a read that forks

        found.extend(fanout.each(read, rest, _plain, _from_plain, n))
    return found


def shares(spans: Sequence[float], left: int, cpus: int, worth: float) -> int:
    """How many processes should read the `left` items still to read, given what each
    probed item took (`spans`, seconds): as many as give each `worth` seconds of work,
    at most one per CPU and one per item; 1 means this process alone. The slowest
    probed item is left out of the estimate: the first of a kind may import what all
    the others then share (mobynit.core.layers at the first extension)."""
    if cpus < 2 or left < 2 or not spans:
        return 1
    counted = sorted(spans)[:-1] if len(spans) > 1 else list(spans)
    per_item = sum(counted) / len(counted)
    wanted = int(per_item * left / worth) if worth > 0 else cpus
    return max(1, min(cpus, left, wanted))


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(posix.sched_getaffinity(0))
    except OSError:
        return 1


def _plain(ext: Extension | None) -> object:
    """`ext` as marshal carries it, for fanout; every field of every record in it
    (tests/unit/test_fanout.py fills each field there is and checks the way back)."""
    if ext is None:
        return None
    c, m = ext.container, ext.modules
    container = None if c is None else (
        c.id, c.name, c.labels, c.state, c.overlay2, c.config,
        tuple((la.id, la.path, la.link, None if la.facts is None else _facts_plain(la.facts)) for la in c.layers),
    )
    modules = None if m is None else (m.release, m.symvers_sha256)
    return ext.id, ext.name, container, modules, ext.fault, ext.release, ext.release_name, ext.image, ext.rank


def _facts_plain(f: LayerFacts) -> tuple[object, ...]:
    return f.whiteouts, f.opaques, f.xattrs, f.paths, f.dirs


def _from_plain(value: object) -> Extension | None:
    """The inverse of _plain."""
    if value is None:
        return None
    eid, name, c, m, fault, release, release_name, image, rank = value  # type: ignore[misc]
    container = None
    if c is not None:
        cid, cname, labels, state, overlay2, config, layers = c
        container = Container(id=cid, name=cname, labels=labels, state=state, overlay2=overlay2, config=config,
                              layers=tuple(Layer(id=lid, path=path, link=link,
                                                 facts=None if f is None else _facts_from_plain(f))
                                           for lid, path, link, f in layers))
    modules = None if m is None else KernelModules(release=m[0], symvers_sha256=m[1])
    return Extension(id=eid, name=name, container=container, modules=modules, fault=fault, release=release,
                     release_name=release_name, image=image, rank=rank)


def _facts_from_plain(f: tuple[object, ...]) -> LayerFacts:
    whiteouts, opaques, xattrs, paths, dirs = f
    return LayerFacts(whiteouts=whiteouts, opaques=opaques, xattrs=xattrs, paths=paths, dirs=dirs)


_MARKER_HEAD = b"io.balena."  # the head of both labels.MARKERS (tests/unit/test_speed_paths.py holds it so)


def _layer_lookups() -> tuple[Callable[..., KernelModules | None], Callable[..., tuple[str, dict[str, str]] | None]]:
    """mobynit.core.layers's two lookups, imported at the first extension (a store of applications never needs them)."""
    global _LOOKUPS
    if _LOOKUPS is None:
        from mobynit.core.layers import probe_modules, read_extension_release

        _LOOKUPS = (probe_modules, read_extension_release)
    return _LOOKUPS


_LOOKUPS: tuple[Callable[..., KernelModules | None], Callable[..., tuple[str, dict[str, str]] | None]] | None = None


def _present(path: str) -> bool:
    """Whether `path` exists; a file system that cannot tell (damaged, EUCLEAN) is said, not read as absent."""
    try:
        posix.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"{path}: {e.strerror}") from None
    return True


def _short(name: str) -> str:
    return name[:12] if is_id(name) else printable(name)


def _best_name(raw: bytes) -> str | None:
    """The container's name from a config that failed a later check, if it has one."""
    try:
        name = jsonio.loads(raw).get("Name")  # type: ignore[union-attr]
    except (ValueError, RecursionError, AttributeError):
        return None
    return name.removeprefix("/")[:80] if isinstance(name, str) and name else None


def hostapp_id(sysroot: str) -> str:
    """The hostapp container id: the basename of the `current` symlink."""
    current = f"{sysroot.rstrip('/')}/current"
    target = readlink(current, "missing; no hostapp is installed")
    cid = target.rstrip("/").rpartition("/")[2]
    if not is_id(cid):
        raise StoreError(f"{current}: points to {target[:120]!r}, whose basename is not a 64-hex container id")
    return cid
