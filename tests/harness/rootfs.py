"""Small root filesystem trees for images: busybox plus whatever a test needs.

File specs (values of a `files` mapping, keyed by a path relative to the tree):
bytes or str (a 0644 file), File (content and mode), Symlink, Dir.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import attrs

BUSYBOX = "/bin/busybox"  # from busybox-static: no libraries to carry along

APPLETS = (
    "sh", "cat", "ls", "echo", "mount", "umount", "poweroff", "reboot", "halt",
    "test", "[", "stat", "touch", "mkdir", "rm", "grep", "find", "sleep", "true",
    "false", "uname", "readlink", "head", "tail", "wc", "sed", "dmesg", "sync",
    "cp", "mv", "ln", "chmod", "env", "printf", "tr", "cut", "sha256sum", "id",
)

EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp", "etc", "mnt/sysroot/active", "mnt/data", "root", "var")


@attrs.frozen
class File:
    content: bytes | str
    mode: int = 0o644


@attrs.frozen
class Symlink:
    target: str


@attrs.frozen
class Dir:
    mode: int = 0o755


FileSpec = bytes | str | File | Symlink | Dir


def _safe_relpath(relpath: str) -> str:
    rel = os.path.normpath(relpath.lstrip("/"))
    if rel in ("", ".") or rel.startswith(".."):
        raise ValueError(f"file spec path {relpath!r} does not name a path inside the tree")
    return rel


def write_files(root: str | os.PathLike[str], files: Mapping[str, FileSpec]) -> None:
    """Create each spec under `root`, making parent directories (0755) as needed."""
    base = Path(root)
    for relpath, spec in files.items():
        path = base / _safe_relpath(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, Dir):
            path.mkdir(exist_ok=True)
            path.chmod(spec.mode)
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        if isinstance(spec, Symlink):
            path.symlink_to(spec.target)
            continue
        content, mode = (spec.content, spec.mode) if isinstance(spec, File) else (spec, 0o644)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)


def busybox_tree(root: str | os.PathLike[str], files: Mapping[str, FileSpec] | None = None) -> Path:
    """A minimal tree: static busybox at /bin/busybox, applet links in /bin, the usual dirs."""
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for d in EMPTY_DIRS:
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "bin").mkdir(exist_ok=True)
    (base / "sbin").mkdir(exist_ok=True)
    (base / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, base / "bin" / "busybox")
    for applet in APPLETS:
        link = base / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    write_files(base, files or {})
    return base
