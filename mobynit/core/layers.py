"""What a stack of layers holds, looked up as overlayfs would, without mounting it.

Boot must decide about an extension before anything is mounted: whether it
ships kernel modules for the running kernel (and their Module.symvers), and
its systemd-sysext extension-release file. Both are looked up here, top
layer first, with overlayfs's rules: a whiteout or a non-directory hides
what lies below, an opaque directory hides the rest of the path. Symlinks
are never followed; files are read through mobynit.core.fileio.
"""

from __future__ import annotations

import posix
import stat

from mobynit.core.compat import RELEASE_DIR, parse_os_release
from mobynit.core.errors import StoreError
from mobynit.core.fileio import read_file
from mobynit.core.model import KernelModules

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from mobynit.core.facts import LayerFacts

SYMVERS_LIMIT = 64 << 20
RELEASE_LIMIT = 64 << 10

_WHITEOUT = "whiteout"


def _layer_lookup(layer: str, parts: Sequence[str]) -> tuple[str | None, bool]:
    """Look `parts` up in one layer as overlayfs would.

    Returns (kind, stop): kind is "dir", "file", "whiteout", "other" or None
    (absent); stop says that this layer hides the path in the layers below
    (a whiteout, an opaque directory, or a non-directory on the way).
    Symlinks are never followed: one on the way counts as a non-directory.
    """
    path = layer
    for depth, part in enumerate(parts):
        path = f"{path}/{part}"
        try:
            st = posix.lstat(path)
        except OSError:
            return None, False
        last = depth == len(parts) - 1
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            return _WHITEOUT, True
        if not stat.S_ISDIR(mode):
            # A file, device or symlink hides whatever lower layers hold here.
            return (("file" if stat.S_ISREG(mode) else "other") if last else None), True
        if _is_opaque(path):
            if last:
                return "dir", True
            # An opaque directory on the way hides the rest of the path below.
            kind, _ = _layer_lookup(path, parts[depth + 1 :])
            return kind, True
        if last:
            return "dir", False
    return None, False


def _is_opaque(path: str) -> bool:
    try:
        return posix.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def lookup(layers: Sequence[str], relpath: str) -> tuple[str, str] | None:
    """(kind, path) of `relpath` in the merged view of `layers` (top first), or None."""
    parts = [p for p in relpath.split("/") if p]
    for layer in layers:
        kind, stop = _layer_lookup(layer, parts)
        if kind == _WHITEOUT:
            return None
        if kind is not None:
            return kind, f"{layer}/{'/'.join(parts)}"
        if stop:
            return None
    return None




def _surely_absent(known: Sequence[LayerFacts | None] | None, relpath: str) -> bool:
    """True when every layer's recorded path list proves `relpath` absent: no syscalls needed."""
    if not known:
        return False
    for f in known:
        if f is None or f.paths is None or relpath in f.paths:
            return False
    return True


def probe_modules(
    layers: Sequence[str], release: str, known: Sequence[LayerFacts | None] | None = None, prefix: str = ""
) -> KernelModules | None:
    """What the stack carries under <prefix>lib/modules/<release>, for the ABI check
    (`prefix` "usr/" for a sysext image, which holds only /usr and /opt).

    `known` are the layers' recorded facts, when there are: they answer
    "nothing there" for most extensions without touching the disk.
    """
    if not release or "/" in release or release in (".", ".."):
        return None
    where = f"{prefix}lib/modules/{release}"
    if _surely_absent(known, where):
        return None
    found = lookup(layers, where)
    if found is None or found[0] != "dir":
        return None
    symvers = lookup(layers, f"{where}/Module.symvers")
    if symvers is None or symvers[0] != "file":
        return KernelModules(release=release, symvers_sha256=None)
    import hashlib  # only extensions that ship modules pay for it

    return KernelModules(release=release, symvers_sha256=hashlib.sha256(read_file(symvers[1], SYMVERS_LIMIT)).hexdigest())


# --- release files -------------------------------------------------------------------

def _names_in(layers: Sequence[str], relpath: str) -> set[str]:
    """The entries of directory `relpath` in the merged view of `layers` (top first)."""
    parts = [p for p in relpath.split("/") if p]
    names: set[str] = set()
    hidden: set[str] = set()
    for layer in layers:
        kind, stop = _layer_lookup(layer, parts)
        if kind == _WHITEOUT or (kind is not None and kind != "dir"):
            break
        if kind == "dir":
            try:
                with posix.scandir(f"{layer}/{relpath}") as it:
                    for entry in it:
                        if entry.name in hidden or entry.name in names:
                            continue
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                            hidden.add(entry.name)
                        else:
                            names.add(entry.name)
            except OSError:
                pass
        if stop:
            break
    return names


def read_release_file(layers: Sequence[str], relpath: str) -> dict[str, str] | None:
    """An os-release style file in the merged view of `layers`, parsed; None if absent."""
    found = lookup(layers, relpath)
    if found is None or found[0] != "file":
        return None
    try:
        text = read_file(found[1], RELEASE_LIMIT).decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"{found[1]}: not UTF-8 text") from None
    return parse_os_release(text)


def read_extension_release(
    layers: Sequence[str], name: str, known: Sequence[LayerFacts | None] | None = None
) -> tuple[str, dict[str, str]] | None:
    """(its name, its fields): the extension's `extension-release.<name>`, the one
    named after the container, else the only one there is; None when it carries none."""
    if _surely_absent(known, RELEASE_DIR):
        return None
    prefix = "extension-release."
    names = sorted(n for n in _names_in(layers, RELEASE_DIR) if n.startswith(prefix))
    if not names:
        return None
    wanted = f"{prefix}{name}"
    if wanted not in names:
        if len(names) > 1:
            raise StoreError(f"{layers[0]}/{RELEASE_DIR}: {len(names)} extension-release files and none is {wanted}")
        wanted = names[0]
    relpath = f"{RELEASE_DIR}/{wanted}"
    fields = read_release_file(layers, relpath)
    if fields is None:
        raise StoreError(f"{layers[0]}/{relpath}: not a regular file")
    return wanted[len(prefix) :], fields


def read_os_release(layers: Sequence[str]) -> dict[str, str]:
    """The hostapp's os-release (etc/os-release, else usr/lib/os-release); {} if it has none.

    Symlinks are not followed (etc/os-release is often one): the second path covers that.
    """
    for path in ("etc/os-release", "usr/lib/os-release"):
        found = read_release_file(layers, path)
        if found is not None:
            return found
    return {}
