"""Every system call mobynit makes that Python 3.11 does not wrap.

Kept small and dependency-free: it is on the boot path. The constants cost
nothing to import; ctypes and libc are loaded at the first call, so a run
that mounts nothing (`plan`) never pays for them. Each wrapper raises
OSError with the errno and a description of the call, so callers can turn
it into a sentence without guessing what failed.
"""

from __future__ import annotations

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

# The mount flags a plan names, by the words mount(8) uses.
FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV}

_LIBC = None


def _libc():  # type: ignore[no-untyped-def]
    global _LIBC
    if _LIBC is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
        libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
        libc.unshare.argtypes = (ctypes.c_int,)
        libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.syscall.restype = ctypes.c_long
        _LIBC = libc
    return _LIBC


def _enc(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def _fail(call: str) -> OSError:
    import ctypes

    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    if _libc().mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) < 0:
        raise _fail(f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    if _libc().umount2(_enc(target), flags) < 0:
        raise _fail(f"umount {target}")


def unshare(flags: int) -> None:
    if _libc().unshare(flags) < 0:
        raise _fail("unshare")


def setns(fd: int, nstype: int = 0) -> None:
    if _libc().setns(fd, nstype) < 0:
        raise _fail("setns")


def _syscall(call: str, number: int, *args: object) -> int:
    from ctypes import c_long

    ret = _libc().syscall(c_long(number), *args)
    if ret < 0:
        raise _fail(call)
    return int(ret)


def fsopen(fstype: str) -> int:
    """A filesystem context to configure; the caller closes the fd."""
    from ctypes import c_uint

    return _syscall(f"fsopen {fstype}", SYS_fsopen, _enc(fstype), c_uint(FSOPEN_CLOEXEC))


def fsconfig_string(fd: int, key: str, value: str) -> None:
    """One parameter; relative paths resolve against the current directory, values are capped at 256 bytes."""
    from ctypes import c_int, c_uint

    _syscall(
        f"fsconfig {key}={value}", SYS_fsconfig, c_int(fd), c_uint(FSCONFIG_SET_STRING),
        _enc(key), _enc(value), c_int(0),
    )


def fsconfig_create(fd: int) -> None:
    from ctypes import c_int, c_uint

    _syscall("fsconfig create", SYS_fsconfig, c_int(fd), c_uint(FSCONFIG_CMD_CREATE), None, None, c_int(0))


def fsmount(fd: int, attr_flags: int) -> int:
    """A detached mount of the configured filesystem; the caller closes the fd."""
    from ctypes import c_int, c_uint

    return _syscall("fsmount", SYS_fsmount, c_int(fd), c_uint(FSMOUNT_CLOEXEC), c_uint(attr_flags))


def move_mount_to(mount_fd: int, target: str) -> None:
    """Attach a detached mount (from fsmount) at `target`."""
    from ctypes import c_int, c_uint

    _syscall(
        f"move_mount {target}", SYS_move_mount, c_int(mount_fd), b"", c_int(AT_FDCWD),
        _enc(target), c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
