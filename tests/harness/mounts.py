"""Mount-table helpers shared by the engine driver and the test fixtures.

Tests and engines mount for real; these let them see what is mounted in the
current mount namespace and take away what they left behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mobynit.core import syscalls

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fstype: str
    source: str


def mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """The mount table of a process's mount namespace, in kernel order."""
    entries = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            tail = right.split()
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    fstype=tail[0] if tail else "",
                    source=_unescape(tail[1]) if len(tail) > 1 else "",
                )
            )
    return entries


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def mounts_under(*prefixes: str) -> list[MountEntry]:
    """Mounts whose mount point is one of `prefixes` or below one, deepest first."""
    real = tuple(os.path.realpath(p) for p in prefixes)
    found = [m for m in mountinfo() if _under(m.mount_point, real)]
    return sorted(found, key=lambda m: m.mount_point.count("/"), reverse=True)


def detach(entries: list[MountEntry]) -> list[str]:
    """Lazily unmount each entry (deepest first); returns the mount points detached.

    A detach of a parent takes its children along, so later EINVAL/ENOENT are
    expected and ignored.
    """
    done = []
    for m in sorted(entries, key=lambda m: m.mount_point.count("/"), reverse=True):
        try:
            syscalls.umount(m.mount_point, syscalls.MNT_DETACH)
            done.append(m.mount_point)
        except OSError:
            pass
    return done


def unmount_under(*prefixes: str) -> list[str]:
    """Detach everything mounted at or below `prefixes`, repeating for stacked mounts."""
    done: list[str] = []
    for _ in range(16):  # a mount point may carry several stacked mounts
        entries = mounts_under(*prefixes)
        if not entries:
            break
        detached = detach(entries)
        if not detached:
            break
        done += detached
    return done


def current_namespace() -> tuple[int, int]:
    """(dev, inode) of this process's mount namespace, to compare namespaces."""
    st = os.stat("/proc/self/ns/mnt")
    return (st.st_dev, st.st_ino)


class NamespaceVisit:
    """Temporarily enter the mount namespace behind `ns_fd`, then come back.

    setns() resets the root and working directory to the namespace's, so the
    working directory is restored by path on return.
    """

    def __init__(self, ns_fd: int) -> None:
        self._target = ns_fd
        self._home = -1
        self._cwd = ""

    def __enter__(self) -> "NamespaceVisit":
        self._cwd = os.getcwd()
        self._home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        syscalls.setns(self._target, syscalls.CLONE_NEWNS)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            syscalls.setns(self._home, syscalls.CLONE_NEWNS)
        finally:
            os.close(self._home)
            _chdir_quietly(self._cwd)


def _chdir_quietly(path: str) -> None:
    try:
        os.chdir(path)
    except OSError:
        os.chdir("/")



class PrivateNamespace:
    """A private mount namespace for this (single-threaded) process, left by setns.

    enter(): remember the current namespace and cwd, unshare(CLONE_NEWNS), make
    `/` recursively private (nothing propagates back), snapshot the mount table.
    leave(): detach every mount that was not there at enter(), return to the
    saved namespace and cwd, and return the mount points that were left behind.
    unshare(CLONE_NEWNS) fails with EINVAL in a multi-threaded process.
    """

    def __init__(self) -> None:
        self._saved = -1
        self._cwd = "/"
        self._before: set[int] = set()

    def enter(self) -> "PrivateNamespace":
        self._cwd = os.getcwd()
        self._saved = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        except OSError:
            os.close(self._saved)
            self._saved = -1
            raise
        self._before = {m.mount_id for m in mountinfo()}
        return self

    def leftovers(self) -> list[MountEntry]:
        return [m for m in mountinfo() if m.mount_id not in self._before]

    def leave(self) -> list[str]:
        if self._saved < 0:
            raise RuntimeError("PrivateNamespace.leave() without enter()")
        left = self.leftovers()
        try:
            detach(left)
        finally:
            try:
                syscalls.setns(self._saved, syscalls.CLONE_NEWNS)
            finally:
                os.close(self._saved)
                self._saved = -1
                _chdir_quietly(self._cwd)
        return [m.mount_point for m in left]

    def __enter__(self) -> "PrivateNamespace":
        return self.enter()

    def __exit__(self, *exc: object) -> None:
        self.leave()


def enter_private_namespace() -> None:
    """Move this process for good into a private mount namespace with `/` rprivate."""
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
