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

# The new mount API (x86-64 numbers; glibc 2.36 has no wrappers for all of them).
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

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
_libc.syscall.restype = ctypes.c_long


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


def _syscall(call: str, number: int, *args: object) -> int:
    ret = _libc.syscall(ctypes.c_long(number), *args)
    if ret < 0:
        raise _fail(call)
    return int(ret)


def fsopen(fstype: str) -> int:
    """A filesystem context to configure; the caller closes the fd."""
    return _syscall(f"fsopen {fstype}", SYS_fsopen, _enc(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))


def fsconfig_string(fd: int, key: str, value: str) -> None:
    """One parameter; relative paths resolve against the current directory, values are capped at 256 bytes."""
    _syscall(
        f"fsconfig {key}={value}", SYS_fsconfig, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_STRING),
        _enc(key), _enc(value), ctypes.c_int(0),
    )


def fsconfig_create(fd: int) -> None:
    _syscall("fsconfig create", SYS_fsconfig, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))


def fsmount(fd: int, attr_flags: int) -> int:
    """A detached mount of the configured filesystem; the caller closes the fd."""
    return _syscall("fsmount", SYS_fsmount, ctypes.c_int(fd), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attr_flags))


def move_mount_to(mount_fd: int, target: str) -> None:
    """Attach a detached mount (from fsmount) at `target`."""
    _syscall(
        f"move_mount {target}", SYS_move_mount, ctypes.c_int(mount_fd), b"", ctypes.c_int(AT_FDCWD),
        _enc(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
