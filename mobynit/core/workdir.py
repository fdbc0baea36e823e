"""The work directory: one assemble at a time, nothing left of an interrupted one, no root on a root.

Nested roots mount one overlay per image under the work directory, and flat
mount(2) roots put their layer links there. A run killed part-way leaves
those mounts behind, and a second run racing the first mounts over them;
either way the next rmdir fails and every extension is dropped for a reason
that has nothing to do with them. So a run takes an exclusive lock on the
work directory (flock on the directory itself: no lock file to plant or
leave), detaches whatever is still mounted beneath it, and refuses a target
that already has something mounted on it.
"""

from __future__ import annotations

import fcntl
import posix

from mobynit.core import syscalls
from mobynit.core.errors import MountError
from mobynit.core.fileio import O_DIR, make_dirs
from mobynit.core.mounttable import mount_points
from mobynit.core.paths import normpath



class WorkDir:
    """Held for the duration of one assembly: `with WorkDir(path):`."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str) -> None:
        self.path = normpath(path)
        self.fd = -1

    def __enter__(self) -> WorkDir:
        try:
            make_dirs(self.path, 0o755)
            self.fd = posix.open(self.path, O_DIR)
        except OSError as e:
            raise MountError(f"work directory {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            posix.close(self.fd)
            raise MountError(f"work directory {self.path} is in use by another mobynit: wait for it to finish,"
                             " or give this one another --workdir") from None
        if posix.listdir(self.fd):  # an empty directory has nothing mounted beneath it
            self.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        posix.close(self.fd)  # releases the lock
        self.fd = -1

    def clear(self) -> None:
        """Detach what an interrupted run left mounted beneath the work directory, deepest first."""
        prefix = self.path.rstrip("/") + "/"
        for point in sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True):
            try:
                syscalls.umount(point, syscalls.MNT_DETACH)
            except OSError as e:
                raise MountError(f"cannot detach {point}, left by an interrupted run: {e.strerror}") from None
