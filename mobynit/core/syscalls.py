"""Every system call mobynit makes that Python 3.11 does not wrap.

Kept small and dependency-free: it is on the boot path. The constants cost
nothing to import; libc is bound at the first call, through `_ctypes` rather
than the ctypes package (see _Libc), so a run that mounts nothing (`plan`)
never pays for it and one that mounts pays a fifth of what ctypes would. Each wrapper raises
OSError with the errno and a description of the call, so callers can turn
it into a sentence without guessing what failed.
"""

from __future__ import annotations

import posix
import sys

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
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_finit_module = 313
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_BENEATH = 0x200  # Linux >= 6.5: attach beneath the top mount at the target
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = 0o2000000

# Loop devices, from <linux/loop.h>.
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux >= 5.8: attach and configure in one call
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4  # the device detaches itself when its last user (the mount) goes
AT_FDCWD = -100

# The mount flags a plan names, by the words mount(8) uses.
FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV}

_LIBC = None


class _Libc:
    """libc's functions, bound through `_ctypes` (the C half of ctypes) directly.

    `import ctypes` costs about 2 ms at boot (its Python module builds dozens
    of types); the few calls below need only a function pointer class, four
    argument types and errno, which `_ctypes` provides as ctypes itself uses
    them (ctypes/__init__.py: CDLL, c_int, c_char_p...).
    """

    __slots__ = ("_handle", "mount", "umount2", "unshare", "setns", "syscall", "fsconfig", "ioctl", "get_errno", "c_int",
                 "c_uint", "c_long")

    def __init__(self) -> None:
        import _ctypes

        class c_int(_ctypes._SimpleCData):
            _type_ = "i"

        class c_ulong(_ctypes._SimpleCData):
            _type_ = "L"

        class c_uint(_ctypes._SimpleCData):
            _type_ = "I"

        class c_long(_ctypes._SimpleCData):
            _type_ = "l"

        class c_char_p(_ctypes._SimpleCData):
            _type_ = "z"

        flags = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

        class IntFunction(_ctypes.CFuncPtr):
            _flags_ = flags
            _restype_ = c_int

        class LongFunction(_ctypes.CFuncPtr):
            _flags_ = flags
            _restype_ = c_long

        self._handle = _ctypes.dlopen(None, 0)  # the process's own libc, as ctypes.CDLL(None) opens it

        def bind(name: str, kind: type, *argtypes: type) -> object:
            func = kind((name, self))
            if argtypes:
                func.argtypes = argtypes
            return func

        self.mount = bind("mount", IntFunction, c_char_p, c_char_p, c_char_p, c_ulong, c_char_p)
        self.umount2 = bind("umount2", IntFunction, c_char_p, c_int)
        self.unshare = bind("unshare", IntFunction, c_int)
        self.setns = bind("setns", IntFunction, c_int, c_int)
        self.syscall = bind("syscall", LongFunction)  # variadic: each argument passed as its C type
        # fsconfig, called once per layer: its C types declared once rather than wrapped per call.
        self.fsconfig = bind("syscall", LongFunction, c_long, c_int, c_uint, c_char_p, c_char_p, c_int)
        self.ioctl = bind("ioctl", IntFunction)  # loop devices (live layering): arguments as given
        self.get_errno = _ctypes.get_errno
        self.c_int, self.c_uint, self.c_long = c_int, c_uint, c_long  # for syscall's variadic arguments


def _libc() -> _Libc:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


def _enc(s: str | None) -> bytes | None:
    return None if s is None else s.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())  # os.fsencode


def _fail(call: str) -> OSError:
    err = _libc().get_errno()
    return OSError(err, f"{call}: {posix.strerror(err)}")


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
    libc = _libc()
    ret = libc.syscall(libc.c_long(number), *args)  # type: ignore[operator]
    if ret < 0:
        raise _fail(call)
    return int(ret)


def fsopen(fstype: str) -> int:
    """A filesystem context to configure; the caller closes the fd."""
    libc = _libc()
    return _syscall(f"fsopen {fstype}", SYS_fsopen, _enc(fstype), libc.c_uint(FSOPEN_CLOEXEC))


def fsconfig_string(fd: int, key: str, value: str) -> None:
    """One parameter; relative paths resolve against the current directory, values are capped at 256 bytes."""
    if _libc().fsconfig(SYS_fsconfig, fd, FSCONFIG_SET_STRING, _enc(key), _enc(value), 0) < 0:  # type: ignore[union-attr]
        raise _fail(f"fsconfig {key}={value}")


def fsconfig_create(fd: int) -> None:
    libc = _libc()
    _syscall("fsconfig create", SYS_fsconfig, libc.c_int(fd), libc.c_uint(FSCONFIG_CMD_CREATE), None, None,
             libc.c_int(0))


def fsmount(fd: int, attr_flags: int) -> int:
    """A detached mount of the configured filesystem; the caller closes the fd."""
    libc = _libc()
    return _syscall("fsmount", SYS_fsmount, libc.c_int(fd), libc.c_uint(FSMOUNT_CLOEXEC), libc.c_uint(attr_flags))


def move_mount_to(mount_fd: int, target: str) -> None:
    """Attach a detached mount (from fsmount) at `target`."""
    libc = _libc()
    _syscall(
        f"move_mount {target}", SYS_move_mount, libc.c_int(mount_fd), b"", libc.c_int(AT_FDCWD),
        _enc(target), libc.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )


def move_mount(mount_fd: int, target: str, beneath: bool = False) -> None:
    """Attach a detached mount at `target`; `beneath` puts it under the mount
    already there (MOVE_MOUNT_BENEATH), so that detaching the top one later
    reveals it: a replacement with no moment without either."""
    libc = _libc()
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    _syscall(
        f"move_mount {'beneath ' if beneath else ''}{target}", SYS_move_mount, libc.c_int(mount_fd), b"",
        libc.c_int(AT_FDCWD), _enc(target), libc.c_uint(flags),
    )


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount at `path` (a bind mount not yet attached); the caller closes the fd."""
    libc = _libc()
    return _syscall(f"open_tree {path}", SYS_open_tree, libc.c_int(AT_FDCWD), _enc(path),
                    libc.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC))


def fsmount_fd(fstype: str, options: list[tuple[str, str]], attr_flags: int = MOUNT_ATTR_RDONLY) -> int:
    """A detached mount of a new `fstype` filesystem configured by string `options`."""
    fd = fsopen(fstype)
    try:
        for key, value in options:
            fsconfig_string(fd, key, value)
        fsconfig_create(fd)
        return fsmount(fd, attr_flags)
    finally:
        posix.close(fd)


def finit_module(fd: int, name: str) -> None:
    """Load the kernel module in the open file `fd` (the initramfs has no modprobe)."""
    libc = _libc()
    _syscall(f"load module {name}", SYS_finit_module, libc.c_int(fd), b"", libc.c_int(0))


def loop_attach(image_fd: int) -> tuple[str, int]:
    """A read-only, self-clearing loop device over the open file `image_fd`:
    (its path, an open descriptor of it). Closing the descriptor before
    anything mounts it detaches the device again."""
    import ctypes
    import struct

    ctl = posix.open("/dev/loop-control", posix.O_RDWR | posix.O_CLOEXEC)
    try:
        for _attempt in range(8):  # another process may take the free device first
            number = _libc().ioctl(ctl, LOOP_CTL_GET_FREE)
            if number < 0:
                raise _fail("loop-control get free")
            path = f"/dev/loop{number}"
            try:
                dev = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
            except FileNotFoundError:
                raise OSError(2, f"{path}: no device node (is devtmpfs mounted?)") from None
            # struct loop_config: fd, block_size, struct loop_info64 (232 bytes), 64 reserved bytes.
            info = struct.pack("=5Q4I64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0,
                               LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0)
            config = ctypes.create_string_buffer(struct.pack("=II", image_fd, 0) + info + bytes(64))
            if _libc().ioctl(dev, LOOP_CONFIGURE, config) == 0:
                return path, dev
            err = ctypes.get_errno()
            posix.close(dev)
            if err != 16:  # EBUSY: taken meanwhile, ask again
                raise OSError(err, f"loop configure {path}: {posix.strerror(err)}")
        raise OSError(16, "no free loop device after 8 attempts")
    finally:
        posix.close(ctl)
