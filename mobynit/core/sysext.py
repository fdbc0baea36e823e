"""systemd-sysext images: where they are found, what they are, whether they suit this OS.

Used by `mobynit merge`/`list`/`refresh` (mobynit.tools.live), and kept to
core's rules (standard library only, nothing costly at import) so that the
boot path can read the same images with the same words.

An image is a directory or a `NAME.raw` file holding a naked squashfs or
erofs file system, in one of the search directories below; the first
directory holding a name wins, as in systemd-sysext. Nothing here follows a
symlink: an entry of a search directory that is a symlink is refused, and so
is a hierarchy inside an image that is one (a `usr` pointing out of the image
would put whatever it names into /usr). Deeper symlinks are content: they
appear in the merged tree as symlinks, as systemd-sysext shows them.
"""

from __future__ import annotations

import posix
import stat

from mobynit.core import compat
from mobynit.core.errors import StoreError, shown
from mobynit.core.fileio import read_file
from mobynit.core.model import Record
from mobynit.core.paths import join

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# Search order (precedence) of systemd-sysext's image directories, relative to the root.
SEARCH_DIRS = ("etc/extensions", "run/extensions", "var/lib/extensions", "usr/local/lib/extensions",
               "usr/lib/extensions")
HIERARCHIES = ("/usr", "/opt")
RELEASE_LIMIT = 64 << 10
HEAD = 4096  # enough of an image to recognise its superblock or partition table

DIRECTORY = "directory"
SQUASHFS = "squashfs"
EROFS = "erofs"


class Image(Record):
    """One entry of a search directory: `kind` is directory, squashfs or erofs,
    or None with `fault` saying in one line why it cannot be used."""

    __slots__ = ("name", "path", "kind", "fault")
    name: str
    path: str  # the entry, as found under the root
    kind: str | None
    fault: str | None


def discover(root: str) -> list[Image]:
    """Every candidate image under `root`'s search directories, first found first;
    a name seen again in a later directory is reported as shadowed."""
    found: list[Image] = []
    seen: dict[str, str] = {}
    for rel in SEARCH_DIRS:
        directory = _real_dir(root, rel)
        if directory is None:
            continue
        try:
            names = sorted(posix.listdir(directory))
        except OSError:
            continue
        for entry in names:
            if entry.startswith("."):
                continue
            image = _entry(directory, entry)
            if image is None:
                continue
            if image.name in seen:
                image = image.replace(kind=None, fault=f"shadowed by {seen[image.name]}")
            else:
                seen[image.name] = image.path
            found.append(image)
    return found


def _real_dir(root: str, rel: str) -> str | None:
    """`root/rel` when every component below root is a real directory; None otherwise."""
    path = root.rstrip("/") or "/"
    for part in rel.split("/"):
        path = join(path, part)
        try:
            st = posix.lstat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    return path


def _entry(directory: str, entry: str) -> Image | None:
    path = join(directory, entry)
    try:
        st = posix.lstat(path)
    except OSError as e:
        return Image(name=entry, path=path, kind=None, fault=f"{path}: {e.strerror}")
    name = entry[:-4] if entry.endswith(".raw") else entry
    if stat.S_ISLNK(st.st_mode):
        return Image(name=name, path=path, kind=None, fault=f"{path} is a symlink, not followed (put the image itself there)")
    if stat.S_ISDIR(st.st_mode):
        return Image(name=entry, path=path, kind=DIRECTORY, fault=None)
    if not entry.endswith(".raw") or not name:
        return None  # not an image name: systemd-sysext ignores it too
    if not stat.S_ISREG(st.st_mode):
        return Image(name=name, path=path, kind=None, fault=f"{path} is not a regular file")
    kind, fault = identify(path)
    return Image(name=name, path=path, kind=kind, fault=fault)


def identify(path: str) -> tuple[str | None, str | None]:
    """(squashfs or erofs, None), or (None, why not): from the superblock, and
    whether the file is as long as the file system says it is."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC)
    except OSError as e:
        return None, f"{path}: cannot open: {e.strerror}"
    try:
        return identify_open(fd, path, posix.fstat(fd).st_size)
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror}"
    finally:
        posix.close(fd)


def identify_open(fd: int, path: str, size: int) -> tuple[str | None, str | None]:
    """`identify` of the image open as `fd` (`size` bytes long, `path` as it is to be
    named); raises OSError when it cannot be read."""
    head = posix.pread(fd, HEAD, 0)
    gpt = posix.pread(fd, 8, 512) == b"EFI PART" or posix.pread(fd, 8, 4096) == b"EFI PART"
    return classify(path, head, size, gpt)


def classify(path: str, head: bytes, size: int, gpt: bool) -> tuple[str | None, str | None]:
    """The pure part of `identify`: the first bytes and the size decide."""
    import struct

    if len(head) >= 96 and head[:4] == b"hsqs":
        used = struct.unpack_from("<Q", head, 40)[0]
        major = struct.unpack_from("<H", head, 28)[0]
        if major != 4:
            return None, f"{path}: squashfs version {major}, only version 4 is mounted by Linux"
        if used > size:
            return None, f"{path}: truncated squashfs ({size} bytes of the {used} its superblock names)"
        return SQUASHFS, None
    if len(head) >= 1024 + 48 and head[1024:1028] == b"\xe2\xe1\xf5\xe0":
        blkszbits = head[1024 + 12]
        blocks = struct.unpack_from("<I", head, 1024 + 36)[0]
        if not 9 <= blkszbits <= 16:
            return None, f"{path}: erofs with an impossible block size (2^{blkszbits})"
        if blocks << blkszbits > size:
            return None, f"{path}: truncated erofs ({size} bytes of the {blocks << blkszbits} its superblock names)"
        return EROFS, None
    if gpt:
        return None, (f"{path}: a GPT disk image (Discoverable Disk Image): not supported here;"
                      " use a naked squashfs or erofs image, or systemd-sysext")
    if size == 0:
        return None, f"{path}: empty file"
    return None, f"{path}: neither a squashfs nor an erofs file system (nor a partition table)"


# --- an image's content, once it is a directory (a mounted image, or a directory image) ----


def release_path(name: str) -> str:
    return f"{compat.RELEASE_DIR}/extension-release.{name}"


def read_release(top: str, name: str) -> tuple[dict[str, str] | None, str | None]:
    """(parsed extension-release.<name>, None) or (None, why not), no symlink followed."""
    where = top.rstrip("/")
    for part in compat.RELEASE_DIR.split("/"):
        where = f"{where}/{part}"
        try:
            st = posix.lstat(where)
        except FileNotFoundError:
            return None, f"has no {release_path(name)} (systemd-sysext refuses such images too)"
        except OSError as e:
            return None, f"{where}: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return None, f"{where[len(top.rstrip('/')) + 1:]} is not a directory (a symlink is not followed)"
    file = f"{where}/extension-release.{name}"
    try:
        raw = read_file(file, RELEASE_LIMIT, display=release_path(name))
    except StoreError as e:
        if str(e).endswith(": missing"):
            others = _other_releases(where)
            if others:
                return None, (f"has no {release_path(name)}, only {shown(', '.join(others), 120)}:"
                              " an image for another name")
            return None, f"has no {release_path(name)} (systemd-sysext refuses such images too)"
        return None, str(e)
    return compat.parse_os_release(raw.decode("utf-8", "surrogateescape")), None


def _other_releases(directory: str) -> list[str]:
    try:
        return sorted(n for n in posix.listdir(directory) if n.startswith("extension-release."))[:3]
    except OSError:
        return []


def content(top: str, hierarchies: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(the hierarchies the image has, refusal, its top-level entries outside them).

    A hierarchy inside the image must be a real directory: a symlink there is
    refused. Top-level entries outside every hierarchy are not merged (as in
    systemd-sysext): `outside_warning` says so; at boot they refuse the image.
    """
    has: list[str] = []
    for h in hierarchies:
        path = top.rstrip("/") + h
        try:
            st = posix.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            return [], f"{h.lstrip('/')}: {e.strerror}", []
        if stat.S_ISLNK(st.st_mode):
            return [], f"{h.lstrip('/')} is a symlink (it could point out of the image), not followed", []
        if not stat.S_ISDIR(st.st_mode):
            return [], f"{h.lstrip('/')} is not a directory", []
        has.append(h)
    firsts = {h.strip("/").split("/")[0] for h in hierarchies}
    try:
        outside = sorted(n for n in posix.listdir(top) if n not in firsts)
    except OSError as e:
        return [], f"cannot list it: {e.strerror}", []
    return has, None, outside


def outside_warning(outside: Sequence[str], hierarchies: Sequence[str]) -> str | None:
    """A live merge's line about the entries `content` found outside the hierarchies."""
    if not outside:
        return None
    return f"files outside {', '.join(hierarchies)} are not merged: {shown(', '.join(outside[:5]), 120)}"


def verdict(name: str, top: str, host_release: Mapping[str, str], host_arch: str) -> str | None:
    """Why this image does not suit the host (one line), or None: its release
    file must exist, be named after it, and match as systemd-sysext matches."""
    release, problem = read_release(top, name)
    if problem is not None:
        return problem
    return compat.sysext_verdict(name, release, host_release, host_arch)


def host_release(root: str) -> dict[str, str]:
    """The running OS's os-release under `root`: etc/os-release when it is a
    file, else usr/lib/os-release (the usual target of etc's symlink)."""
    base = root.rstrip("/")
    for rel in ("etc/os-release", "usr/lib/os-release"):
        try:
            raw = read_file(f"{base}/{rel}", RELEASE_LIMIT)
        except StoreError:
            continue
        return compat.parse_os_release(raw.decode("utf-8", "surrogateescape"))
    return {}


def version_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Order names as systemd's strverscmp_improved does, closely enough:
    runs of digits compare as numbers, everything else as text."""
    parts: list[tuple[int, int | str]] = []
    i, n = 0, len(name)
    while i < n:
        j = i
        digit = name[i].isdigit()
        while j < n and name[j].isdigit() == digit:
            j += 1
        chunk = name[i:j]
        parts.append((1, int(chunk)) if digit else (0, chunk))
        i = j
    return tuple(parts)
