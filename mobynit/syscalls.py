"""Every system call mobynit makes that Python 3.11 does not wrap.

Kept small and dependency-free: it is on the boot path. Each wrapper raises
OSError with the errno and a description of the call, so callers can turn
it into a sentence without guessing what failed.
"""

from __future__ import annotations

import ctypes
import os

# From <linux/mount.h> and <sched.h>.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_DETACH = 0x2

CLONE_NEWNS = 0x00020000

SYS_pivot_root = 155  # x86-64; glibc has no wrapper

FLAG_NAMES = {
    MS_RDONLY: "ro",
    MS_NOSUID: "nosuid",
    MS_NODEV: "nodev",
    MS_NOEXEC: "noexec",
    MS_REMOUNT: "remount",
    MS_BIND: "bind",
    MS_MOVE: "move",
    MS_REC: "rec",
    MS_PRIVATE: "private",
    MS_SLAVE: "slave",
    MS_SHARED: "shared",
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def _enc(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def flag_names(flags: int) -> list[str]:
    """Mount flags as the words mount(8) would print, for plans and logs."""
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) < 0:
        raise _fail(f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(_enc(target), flags) < 0:
        raise _fail(f"umount {target}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) < 0:
        raise _fail("unshare")


def setns(fd: int, nstype: int = 0) -> None:
    if _libc.setns(fd, nstype) < 0:
        raise _fail("setns")


def pivot_root(new_root: str, put_old: str) -> None:
    if _libc.syscall(SYS_pivot_root, _enc(new_root), _enc(put_old)) < 0:
        raise _fail(f"pivot_root {new_root}")
