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

import os

from mobynit.core import jsonio
from mobynit.core import labels as label
from mobynit.core.errors import StoreError
from mobynit.core.errors import shown as printable
from mobynit.core.facts import load as load_facts
from mobynit.core.fileio import read_file, read_text, readlink, require_dir
from mobynit.core.layers import probe_modules, read_extension_release
from mobynit.core.model import Container, Extension, Layer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from mobynit.core.facts import LayerFacts

HEX = frozenset("0123456789abcdef")
LINK_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
LINK_LEN = 26
CONFIG_LIMIT = 4 << 20  # a config.v2.json is a few KiB; refuse to slurp a planted giant
SMALL_LIMIT = 4096  # mount-id, lower


def is_id(name: str) -> bool:
    return len(name) == 64 and HEX.issuperset(name)


def _is_link(name: str) -> bool:
    return len(name) == LINK_LEN and LINK_CHARS.issuperset(name)










def _dir_has_entries(path: str) -> bool:
    with os.scandir(path) as it:
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
    level checked by lstat to be a directory, not a symlink, on the same
    device. A symlink or a mount anywhere on the way is refused, so nothing
    outside the partition is ever read or mounted from it.
    """

    __slots__ = ("root", "top", "containers", "mounts", "overlay2", "_checked", "_device")

    def __init__(self, root: str, top: str | None = None) -> None:
        self.root = root.rstrip("/") or "/"
        self.top = (top.rstrip("/") or "/") if top is not None else (os.path.dirname(self.root) or "/")
        self.containers = f"{self.root}/containers"
        self.mounts = f"{self.root}/image/overlay2/layerdb/mounts"
        self.overlay2 = f"{self.root}/overlay2"
        self._checked: set[str] = set()
        self._device: int | None = None

    def device(self) -> int:
        """The partition's device; on first use, the store root is checked to be
        reached from it through real directories only."""
        if self._device is None:
            try:
                device = os.stat(self.top).st_dev  # the operator's own path: followed
            except OSError as e:
                raise StoreError(f"{self.top}: {e.strerror}") from None
            path = self.top
            below = self.root[len(self.top):] if self.root.startswith(self.top.rstrip("/") + "/") else ""
            for part in below.strip("/").split("/") if below.strip("/") else ():
                path = f"{path.rstrip('/')}/{part}"
                require_dir(path, device)
            self._device = device
        return self._device

    def _dir(self, path: str) -> None:
        require_dir(path, self.device())

    def _require_shared_dir(self, path: str) -> None:
        """The store's own directories, each level from the root down: checked once, not once per container."""
        if path in self._checked:
            return
        rel = path[len(self.root) + 1 :]
        here = self.root
        for part in rel.split("/"):
            here = f"{here}/{part}"
            if here not in self._checked:
                self._dir(here)
                self._checked.add(here)

    def container(self, cid: str) -> Container:
        """The container `cid` with its layer stack; raises StoreError."""
        if not is_id(cid):
            raise StoreError(f"{self.containers}/{cid[:80]!r}: container id is not 64 hex digits")
        self._require_shared_dir(self.containers)
        self._dir(f"{self.containers}/{cid}")
        path = f"{self.containers}/{cid}/config.v2.json"
        return self._load(cid, path, _parse_config(read_file(path, CONFIG_LIMIT), path, cid))

    def _load(self, cid: str, path: str, parsed: tuple[str, dict[str, str], str | None]) -> Container:
        name, labels, state = parsed
        return Container(
            id=cid,
            name=name,
            labels=labels,
            state=state,
            layers=self.layers(cid),
            overlay2=self.overlay2,
            config=path,
        )

    def layers(self, cid: str) -> tuple[Layer, ...]:
        """The read-only stack of container `cid`, top first, without its -init layer."""
        self._require_shared_dir(self.mounts)
        self._dir(f"{self.mounts}/{cid}")
        mount_id_path = f"{self.mounts}/{cid}/mount-id"
        mount_id = read_text(mount_id_path, SMALL_LIMIT)
        if not is_id(mount_id):
            raise StoreError(f"{mount_id_path}: {mount_id[:80]!r} is not a 64-hex layer id")
        self._require_shared_dir(self.overlay2)
        top = f"{self.overlay2}/{mount_id}"
        self._dir(top)
        self._dir(f"{top}/diff")
        stack: list[Layer] = []
        if _dir_has_entries(f"{top}/diff"):
            stack.append(Layer(id=mount_id, path=f"{top}/diff", link=f"{mount_id}/diff", facts=_facts(top, mount_id)))
        lower_path = f"{top}/lower"
        lower = read_text(lower_path, 64 << 10)
        if not lower:
            raise StoreError(f"{lower_path}: empty")
        seen = {mount_id}
        init_id = f"{mount_id}-init"
        for entry in lower.split(":"):
            layer = self._resolve(entry, lower_path)
            if layer.id in seen:
                raise StoreError(f"{lower_path}: lists layer {layer.id} twice")
            seen.add(layer.id)
            if layer.id != init_id:
                stack.append(layer.replace(facts=_facts(os.path.dirname(layer.path), layer.id)))
        if not stack:
            raise StoreError(f"{lower_path}: no image layers below the -init layer")
        return tuple(stack)

    def _resolve(self, entry: str, lower_path: str) -> Layer:
        """One `l/<LINK>` entry of a lower file, checked to land on `<id>/diff`."""
        head, _, link = entry.partition("/")
        if head != "l" or not _is_link(link):
            raise StoreError(f"{lower_path}: entry {entry[:80]!r} is not of the form l/<26 letters or digits>")
        self._require_shared_dir(f"{self.overlay2}/l")  # the kernel resolves l/<LINK> through it too
        link_path = f"{self.overlay2}/l/{link}"
        target = readlink(link_path, f"missing (listed in {lower_path})")
        dots, _, rest = target.partition("/")
        lid, _, diff = rest.partition("/")
        lid_ok = is_id(lid) or (lid.endswith("-init") and is_id(lid[:-5]))
        if dots != ".." or diff != "diff" or not lid_ok:
            raise StoreError(f"{link_path}: points to {target[:120]!r}, not ../<layer id>/diff")
        layer_dir = f"{self.overlay2}/{lid}"
        self._dir(layer_dir)
        path = f"{layer_dir}/diff"
        self._dir(path)
        return Layer(id=lid, path=path, link=f"l/{link}")

    def scan(self, wanted: Callable[[Mapping[str, str]], bool], release: str) -> list[Extension]:
        """Every container whose labels make it `wanted`, each read on its own.

        A container that cannot be read but looks like an extension comes back
        with a `fault`; one that is plainly an application is not returned.
        A store or `containers` that is missing is an empty store (nothing
        installed yet); one that cannot be read (`docker` a file, a directory
        the file system reports damaged) raises StoreError, so that it is said.
        """
        if not _present(self.root):
            return []  # nothing installed yet
        self.device()  # the store root itself: a real directory on the partition
        if not _present(self.containers):
            return []
        self._require_shared_dir(self.containers)
        try:
            fd = os.open(self.containers, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"{self.containers}: cannot open: {e.strerror}") from None
        found: list[Extension] = []
        try:
            try:
                with os.scandir(fd) as entries:
                    names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
            except OSError as e:
                raise StoreError(f"{self.containers}: cannot read: {e.strerror}") from None
            for name, is_dir in names:
                ext = self._scan_one(fd, name, is_dir, wanted, release)
                if ext is not None:
                    found.append(ext)
        finally:
            os.close(fd)
        return found

    def _scan_one(
        self, fd: int, name: str, is_dir: bool, wanted: Callable[[Mapping[str, str]], bool], release: str
    ) -> Extension | None:
        # Most containers are applications: decide that with as little work as possible,
        # and build the strings a fault needs only when there is one.
        if is_dir:
            try:
                raw = read_file(f"{name}/config.v2.json", CONFIG_LIMIT, dir_fd=fd, display=f"{self.containers}/{name}/config.v2.json")
            except StoreError as e:
                return Extension(id=name, name=_short(name), container=None, modules=None, fault=str(e))
            if label.MARKERS[0] not in raw and label.MARKERS[1] not in raw:  # plainly not an extension
                return None
        shown = f"{self.containers}/{printable(name)}"  # a planted name must not forge console lines
        short = _short(name)
        if not is_dir:
            return Extension(id=name, name=short, container=None, modules=None, fault=f"{shown}: not a directory, not followed")
        path = f"{shown}/config.v2.json"
        try:
            if not is_id(name):
                raise StoreError(f"{shown}: directory name is not a 64-hex container id")
            parsed = _parse_config(raw, path, name)
            cname, labels, _ = parsed
            if not wanted(labels):
                return None
            container = self._load(name, path, parsed)
            dirs = [layer.path for layer in container.layers]
            known = [layer.facts for layer in container.layers]
            modules = probe_modules(dirs, release, known)
            release_file = read_extension_release(dirs, cname, known)
        except StoreError as e:
            return Extension(id=name, name=_best_name(raw) or short, container=None, modules=None, fault=str(e))
        release_name, ext_release = release_file if release_file is not None else (None, None)
        return Extension(
            id=name, name=cname, container=container, modules=modules, fault=None, release=ext_release,
            release_name=release_name,
        )


def _present(path: str) -> bool:
    """Whether `path` exists; a file system that cannot tell (damaged, EUCLEAN) is said, not read as absent."""
    try:
        os.lstat(path)
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

def _facts(layer_dir: str, layer_id: str) -> LayerFacts | None:
    return load_facts(layer_dir, layer_id)
