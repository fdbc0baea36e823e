"""systemd-sysext images that join the root at boot (docs/boot.md, "sysext images at boot").

The data partition's `extensions/` directory (paths.IMAGES) holds images as
systemd-sysext knows them: directories, and `NAME.raw` files holding a naked
squashfs or erofs file system (mobynit.core.sysext tells which). Each is read
as a candidate extension and meets the same gates as a container (the
command-line switches and the purge marker before anything is read, then
extension-release matching and the kernel modules' ABI, in policy.decide);
a kept image is one layer of the root, between the overrides and the
hostapp, so its files are there before PID 1 starts.

Reading a raw image means mounting it: it is loop-mounted read-only, once,
under the work directory (`Mounts`), and the root takes that mount as its
layer. Every such mount is detached when the assembly ends (the root's
overlay keeps its own references), or at once when the image is refused.

At boot an image joins the root whole, so it is held to more than a live
merge: it may hold only `usr/` and `opt/` (a live merge leaves the rest out,
a root would show it), and it may add and replace files but not delete them
(no whiteouts, opaque directories or other overlay xattrs: they would reach
into the hostapp, which the flat and nested layouts do not agree on). Nothing
is followed: the directory, each entry and each image's hierarchies must be
real, on the data partition; a raw image is opened once, without following
a symlink and without blocking, and that descriptor is what the loop
device reads.
"""

from __future__ import annotations

import posix

from mobynit.core import syscalls, sysext
from mobynit.core.errors import StoreError, shown
from mobynit.core.fileio import O_DIR, make_dirs
from mobynit.core.model import Container, Extension, Layer
from mobynit.core.paths import basename, dirname

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from mobynit.core.facts import LayerFacts

_S_IFMT, _S_IFDIR, _S_IFREG, _S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
_O_IMAGE = posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC  # a FIFO never blocks the boot
# What a directory image's name may hold: it becomes a lower layer's name in a mount option.
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+@-")


def mount_image(fd: int, target: str, kind: str) -> None:
    """Mount the open image `fd` read-only at `target` through a self-clearing loop device."""
    device, dev_fd = syscalls.loop_attach(fd)
    try:
        syscalls.mount(device, target, kind, syscalls.MS_RDONLY | syscalls.MS_NODEV | syscalls.MS_NOSUID)
    finally:
        posix.close(dev_fd)  # the mount holds the device now; without one it detaches


class Mounts:
    """The raw images mounted for one assembly, under `base`; all detached on exit.

    `prepare(kind)` runs before each mount: boot loads the loop and file
    system modules there, only when an image needs them.
    """

    def __init__(self, base: str, prepare: Callable[[str], None] | None = None) -> None:
        self.base = base
        self.prepare = prepare
        self.points: list[str] = []

    def close(self) -> None:
        for point in reversed(self.points):
            self.release(point)

    def mount(self, fd: int, kind: str) -> str:
        """Mount the open image `fd` (of `kind`); its mount point. Raises OSError."""
        if self.prepare is not None:
            self.prepare(kind)
        n = len(self.points)
        try:
            make_dirs(self.base, 0o700)
            while True:  # a name a killed run left behind is skipped, not reused
                point = f"{self.base}/{n}"
                try:
                    posix.mkdir(point, 0o700)
                    break
                except FileExistsError:
                    n += 1
        except OSError as e:
            raise OSError(e.errno, f"no mount point under {self.base}: {e.strerror}") from None
        try:
            mount_image(fd, point, kind)
        except OSError:
            posix.rmdir(point)
            raise
        self.points.append(point)
        return point

    def release(self, point: str) -> None:
        """Detach one image (its overlay, if any, keeps its own reference)."""
        try:
            syscalls.umount(point, syscalls.MNT_DETACH)
            posix.rmdir(point)
        except OSError:
            pass  # the work directory's next user detaches what is left (workdir.py)
        if point in self.points:
            self.points.remove(point)


def kernel_refusal(top: str, kernel_release: str, abi_token: str | None) -> str | None:
    """The kernel gate for an image that is not read as an Extension (a live merge):
    modules under usr/lib/modules/<release> need a Module.symvers the ABI matches."""
    from mobynit.core.layers import probe_modules
    from mobynit.core.policy import kernel_verdict

    return kernel_verdict({}, probe_modules([top], kernel_release, prefix="usr/"), kernel_release, abi_token)


def image_id(name: str, st: posix.stat_result) -> str:
    """A 64-hex id for an image, as boot records and the attempts file want one:
    another file (or the same one rewritten) is another id, so a new image
    counts as a new set of extensions for the fallback (docs/fallback.md)."""
    import hashlib

    key = f"sysext\0{name}\0{st.st_dev}\0{st.st_ino}\0{st.st_ctime_ns}\0{st.st_size}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def find(directory: str, device: int, mounts: Mounts, kernel_release: str) -> list[Extension]:
    """Every image in `directory` (on the partition `device`), each an Extension,
    refused ones with their fault; usable ones ranked, the highest version on top.
    Nothing raises: an unreadable directory is one faulted entry."""
    try:
        st = posix.lstat(directory)
    except FileNotFoundError:
        return []
    except OSError as e:
        return [_refused(directory, f"{directory}: {e.strerror}")]
    if st.st_mode & _S_IFMT != _S_IFDIR or st.st_dev != device:
        what = "a symlink" if st.st_mode & _S_IFMT == _S_IFLNK else "not a directory on the data partition"
        return [_refused(directory, f"{directory} is {what}, not followed")]
    try:
        fd = posix.open(directory, O_DIR)
    except OSError as e:
        return [_refused(directory, f"{directory}: cannot open: {e.strerror}")]
    found: list[Extension] = []
    try:
        for name in sorted(posix.listdir(fd)):
            if name.startswith("."):
                continue
            ext = _one(directory, fd, name, device, mounts, kernel_release)
            if ext is not None:
                found.append(ext)
    except OSError as e:
        found.append(_refused(directory, f"{directory}: cannot read: {e.strerror}"))
    finally:
        posix.close(fd)
    usable = sorted((e for e in found if e.fault is None), key=lambda e: sysext.version_key(e.name), reverse=True)
    ranks = {e.id: i for i, e in enumerate(usable)}
    return [e.replace(rank=ranks[e.id]) if e.id in ranks else e for e in found]


def _refused(path: str, fault: str, name: str | None = None, kind: str | None = None) -> Extension:
    import hashlib

    ident = hashlib.sha256(f"sysext\0{path}".encode("utf-8", "surrogateescape")).hexdigest()
    return Extension(id=ident, name=name or basename(path), container=None, modules=None, fault=fault,
                     image=kind or "image")


def _one(directory: str, dir_fd: int, entry: str, device: int, mounts: Mounts,
         kernel_release: str) -> Extension | None:
    path = f"{directory}/{entry}"
    said = f"{shown(directory, 1000)}/{shown(entry)}"  # the operator's directory whole, the entry's name capped
    name = entry[:-4] if entry.endswith(".raw") else entry
    try:
        st = posix.lstat(entry, dir_fd=dir_fd)
    except OSError as e:
        return _refused(path, f"{said}: {e.strerror}", name)
    kind = st.st_mode & _S_IFMT
    if kind == _S_IFLNK:
        return _refused(path, f"{said} is a symlink, not followed (put the image itself there)", name)
    if st.st_dev != device:
        return _refused(path, f"{said} is not on the data partition (a mount point), not followed", name)
    if kind == _S_IFDIR:
        if not NAME_CHARS.issuperset(entry):
            return _refused(path, f"{said}: a directory image's name may hold only letters, digits and"
                                  " ._+@- (it becomes a mount option)", name, sysext.DIRECTORY)
        return _describe(path, said, name, sysext.DIRECTORY, path, image_id(entry, st), kernel_release)
    if not entry.endswith(".raw") or not name:
        return None  # not an image name: systemd-sysext passes it by too
    if kind != _S_IFREG:
        return _refused(path, f"{said} is not a regular file, not opened", name)
    try:
        fd = posix.open(entry, _O_IMAGE, dir_fd=dir_fd)
    except OSError as e:
        return _refused(path, f"{said}: cannot open: {e.strerror}", name)
    try:
        fst = posix.fstat(fd)
        if fst.st_mode & _S_IFMT != _S_IFREG or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return _refused(path, f"{said}: changed while being read", name)
        fs, fault = sysext.identify_open(fd, said, fst.st_size)
        if fs is None:
            return _refused(path, fault or f"{said}: not an image", name)
        try:
            top = mounts.mount(fd, fs)
        except OSError as e:
            return _refused(path, f"{said}: cannot mount it as {fs} ({e.strerror or e})", name, fs)
    except OSError as e:
        return _refused(path, f"{said}: cannot read: {e.strerror}", name)
    finally:
        posix.close(fd)
    ext = _describe(path, said, name, fs, top, image_id(entry, fst), kernel_release)
    if ext.fault is not None:
        mounts.release(top)
    return ext


def _describe(path: str, said: str, name: str, kind: str, top: str, ident: str, kernel_release: str) -> Extension:
    """The image at `top` (a directory, or where it is mounted) as an Extension: its
    release file, modules and layer facts, or the one reason it cannot join a root."""
    from mobynit.core.facts import walk
    from mobynit.core.layers import probe_modules

    def refused(why: str) -> Extension:
        return _refused(path, f"{said}: {why}", name, kind)

    has, refusal, outside = sysext.content(top, sysext.HIERARCHIES)
    if refusal is not None:
        return refused(refusal)
    if outside:
        return refused(f"holds {shown(', '.join(outside[:5]), 120)} outside {', '.join(sysext.HIERARCHIES)}:"
                       " at boot an image joins the root whole, so it may hold only those (merge it live instead)")
    if not has:
        return refused(f"has nothing under {', '.join(sysext.HIERARCHIES)}")
    release, problem = sysext.read_release(top, name)
    if problem is not None:
        return refused(problem)
    try:
        facts: LayerFacts = walk(top, limit=None)
    except OSError as e:
        return refused(f"cannot walk it: {e.strerror}")
    deletes = facts.whiteouts or facts.opaques or facts.xattrs
    if deletes:
        return refused(f"deletes or hides /{shown(deletes[0], 120)} (a whiteout, an opaque directory or an overlay"
                       " xattr): at boot an image may add and replace files, not delete them (merge it live instead)")
    try:
        modules = probe_modules([top], kernel_release, [facts], prefix="usr/")
    except StoreError as e:  # a Module.symvers that is not a readable regular file
        return refused(str(e))
    layer = Layer(id=ident, path=top, link=basename(top), facts=facts)
    container = Container(id=ident, name=name, labels={}, state=None, layers=(layer,),
                          overlay2=dirname(top), config=path)
    return Extension(id=ident, name=name, container=container, modules=modules, fault=None, release=release,
                     release_name=name, image=kind)
