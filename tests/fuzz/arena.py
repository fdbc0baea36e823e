"""The arena: a copy of the standard device to corrupt, mirrors to point at, and a journal to undo.

Every change the corruptions make goes through a Journal: the path is renamed
aside first and renamed back after the example, in reverse order across the
whole copy (the data partition, its store, the sysroot), so an example costs
a few renames, not a copy. No corruption ever writes through a symlink:
every component from the top of the copy down to the changed path is
lstat'ed first (the store root included), so a symlink one corruption plants
cannot lead the next one, or the undoing, outside the copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

from mobynit.core.facts import FACTS_NAME
from mobynit.tools import cli
from tests.harness.device import KERNEL_RELEASE, StandardDevice, copy_device

CANARY = "ESCAPED-FROM-THE-STORE"
MARKER = "io.balena.image.class"

# The directories between the data partition's top and the layers, store-relative ("" is the
# store root, DATA/docker, itself): every one must be a real directory for an extension to be read.
DATA_LEVELS = {
    "root": "",
    "image": "image",
    "image-overlay2": "image/overlay2",
    "layerdb": "image/overlay2/layerdb",
    "mounts": "image/overlay2/layerdb/mounts",
    "containers": "containers",
    "overlay2": "overlay2",
    "l": "overlay2/l",
}


class Undo:
    """The changes of one example, whatever journal made them, undone in reverse order."""

    def __init__(self, stash: Path) -> None:
        self.stash = stash
        self.entries: list[tuple[str, str | None]] = []  # (absolute path, where the original went)
        self.count = 0

    def undo(self) -> None:
        while self.entries:
            path, saved = self.entries.pop()
            remove(path)
            if saved is not None:
                os.rename(saved, path)


class Journal:
    """Changes below `root`, recorded in a shared Undo; paths are relative to `root`."""

    def __init__(self, root: Path, top: Path, log: Undo) -> None:
        self.root = root
        self.top = top  # the copy's top: every component below it must be a real directory
        self.log = log
        self.prefix = os.path.relpath(root, top).split("/") if root != top else []

    def safe(self, rel: str) -> bool:
        """True if every ancestor of `rel`, from the top of the copy down, is a real directory."""
        parts = [*self.prefix, *rel.split("/")]
        path = str(self.top)
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
            self.log.count += 1
            saved = f"{self.log.stash}/{self.log.count}"
            os.rename(path, saved)
        self.log.entries.append((path, saved))
        return path

    def saved_bytes(self) -> bytes | None:
        """The bytes of the file the last take() moved aside, if it was a regular file."""
        saved = self.log.entries[-1][1] if self.log.entries else None
        if saved is None or not stat.S_ISREG(os.lstat(saved).st_mode):
            return None
        with open(saved, "rb") as f:
            return f.read(1 << 20)

    def regular(self, rel: str) -> bool:
        """`rel` is safe to reach and is a regular file now."""
        if not self.safe(rel):
            return False
        try:
            return stat.S_ISREG(os.lstat(f"{self.root}/{rel}").st_mode)
        except OSError:
            return False


def remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
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
            elif name == FACTS_NAME:  # holds ctimes, which undoing changes: presence is what counts
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

    def layer_id(self, k: int) -> str:
        return self.layers[k % len(self.layers)]

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
            "layer_facts": f"{layer}/{FACTS_NAME}",
        }[name]


PARTS = ("cdir", "config", "hostconfig", "mdir", "mount_id", "init_id", "top", "top_diff", "top_lower",
         "top_link", "layer", "layer_diff", "layer_link", "layer_lower", "lnk", "layer_facts")


def _mirror(src: Path, dest: Path) -> None:
    """A copy of a store whose every layer holds the canary: mounted, it shows."""
    dest.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    for diff in (dest / "overlay2").glob("*/diff"):
        (diff / CANARY).write_text("a layer from outside the store was mounted\n")


class Arena:
    """The copy under attack, with everything the corruptions and checks need to know about it."""

    def __init__(self, device: StandardDevice, base: Path) -> None:
        self.pristine = device
        self.dev = copy_device(device, base / "copy")
        self.top = base / "copy"
        self.store = self.dev.data / "docker"
        self.hstore = self.dev.sysroot / "balena"
        self.mirror = base / "mirror" / "docker"  # of the data store
        _mirror(device.data / "docker", self.mirror)
        self.hmirror = base / "hmirror" / "balena"  # of the hostapp store
        _mirror(device.sysroot / "balena", self.hmirror)
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
        index(self.dev)
        self.stash = base / "stash"
        self.stash.mkdir()
        self.log = Undo(self.stash)
        self.journal = Journal(self.store, self.top, self.log)  # the data store
        self.djournal = Journal(self.dev.data, self.top, self.log)  # the data partition (the store root itself)
        self.hjournal = Journal(self.dev.sysroot, self.top, self.log)  # the root partition
        self.forged = False  # a facts document the reader must trust tells a lie (see corruptions.facts)
        self.snapshot = snapshot(self.store)
        self.device_snapshot = snapshot(device.data / "docker")
        self.hcontainer = Container(self.hstore, device.hostapp_id)
        self.hsnapshot = snapshot(self.dev.sysroot)
        self.names = sorted(device.extensions) + [f"app-{n}" for n in range(len(device.apps))]

    def mirror_of(self, rel: str) -> str:
        return str(self.mirror / rel)

    def touched_sysroot(self) -> bool:
        return any(_under(path, str(self.dev.sysroot)) for path, _ in self.log.entries)

    def reset(self) -> None:
        """Undo every corruption; index again if a layer's contents were touched.

        Facts carry the ctimes of the layer's directories, which the undoing renames
        change: left alone they would read as stale from then on, and every later
        example would be nested, never flat.
        """
        touched = any("/diff" in path for path, _ in self.log.entries)
        self.broken = True  # until the undo is through: later examples must not run on a half-restored copy
        self.log.undo()
        self.broken = False
        self.forged = False
        if touched:
            index(self.dev, "--force")
        for leftover in os.listdir(self.stash):
            remove(str(self.stash / leftover))


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def index(dev: StandardDevice, *extra: str) -> None:
    """Record layer facts in the copy with `mobynit index` (both stores)."""
    args = ["--sysroot", str(dev.sysroot), "--data", str(dev.data), "--kernel-release", KERNEL_RELEASE, *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["index", *args])
    assert status == 0, f"mobynit index failed ({status}): {err.getvalue()}"
