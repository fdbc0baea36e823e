"""The one way mobynit reads and writes files it does not fully control.

Reading: a regular file only, opened with O_NOFOLLOW (a final symlink is
refused) and O_NONBLOCK (a FIFO planted where a file belongs is refused, not
waited on), at most `limit` bytes. Directories on the way are checked with
lstat, so a symlink in a store never leads outside it.

Writing: `write_atomic_at` (and `write_atomic`, its path form) writes a
sibling temporary file (O_EXCL|O_NOFOLLOW, so nothing planted at its name is
followed or reused), fsyncs it, renames it over the target and fsyncs the
directory: after a power cut the file holds the old bytes or the new ones,
never a mix, and a failed write leaves no temporary file behind. What lives
under a directory we own is reached through that directory's descriptor.

Every failure raises StoreError with a sentence naming the file.
"""

from __future__ import annotations

import errno
import os
import stat

from mobynit.core.errors import StoreError

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_O_TEMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def read_file(path: str, limit: int, dir_fd: int | None = None, display: str | None = None,
              device: int | None = None, base: str | None = None) -> bytes:
    """A regular file's bytes; never follows a final symlink, never blocks on a FIFO;
    on `device` when one is given (its fstat says so: no extra call). Messages name
    `display`, else `base`/`path` (built only when one is said), else `path`."""
    try:
        fd = os.open(path, _O_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{_shown(path, display, base)}: missing") from None
    except OSError as e:
        raise StoreError(f"{_shown(path, display, base)}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:  # not stat.S_ISREG: a call less per file
            shown = _shown(path, display, base)
            raise StoreError(f"{shown}: not a regular file")
        if device is not None and device != st.st_dev:
            raise StoreError(f"{_shown(path, display, base)}: on another file system (a mount point), not followed")
        if st.st_size > limit:
            raise StoreError(f"{_shown(path, display, base)}: {st.st_size} bytes, more than the {limit} expected")
        data = os.read(fd, st.st_size + 1)
        if len(data) == st.st_size:
            return data  # the common case: one read
        shown = _shown(path, display, base)
        chunks = [data]
        total = len(data)
        while chunk := os.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise StoreError(f"{shown}: more than the {limit} bytes expected")
        return b"".join(chunks)
    except OSError as e:
        raise StoreError(f"{_shown(path, display, base)}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def _shown(path: str, display: str | None, base: str | None) -> str:
    return display or (f"{base}/{path}" if base is not None else path)


def read_text(path: str, limit: int, dir_fd: int | None = None, display: str | None = None,
              device: int | None = None) -> str:
    """A small ASCII file's content, stripped."""
    try:
        return read_file(path, limit, dir_fd, display, device).decode("ascii").strip()
    except UnicodeDecodeError:
        raise StoreError(f"{display or path}: not ASCII text") from None


def require_dir(path: str, device: int | None = None, dir_fd: int | None = None,
                display: str | None = None) -> os.stat_result:
    """A real directory: not missing, not a symlink, not anything else, and on
    `device` when one is given (no mount point crossed); its lstat. `path` may
    be relative to `dir_fd`, and `display` is then its name in messages."""
    shown = display or path
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{shown}: missing") from None
    except OSError as e:
        raise StoreError(f"{shown}: {e.strerror}") from None
    return check_dir(st, shown, device)


def check_dir(st: os.stat_result, shown: str, device: int | None = None) -> os.stat_result:
    """The verdict of require_dir on an lstat or fstat already made."""
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{shown}: is a symlink, not followed")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{shown}: not a directory")
    if device is not None and st.st_dev != device:
        raise StoreError(f"{shown}: on another file system (a mount point), not followed")
    return st


def readlink(path: str, when_missing: str, dir_fd: int | None = None, display: str | None = None) -> str:
    """A symlink's target, never followed; StoreError saying what is wrong otherwise."""
    shown = display or path
    try:
        return os.readlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{shown}: {when_missing}") from None
    except OSError as e:
        raise StoreError(f"{shown}: not a symlink ({e.strerror})") from None


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`, durably; its directory is opened without following a final symlink."""
    directory, name = os.path.split(path)
    dir_fd = open_dir(directory or ".")
    try:
        write_atomic_at(dir_fd, name, data, mode, display=path)
    finally:
        os.close(dir_fd)




# --- relative to an open directory ------------------------------------------------------
#
# What lives under a root we own (the runtime's state) is reached through the
# descriptor of a directory opened with O_NOFOLLOW|O_DIRECTORY: a symlink
# planted anywhere below it is refused or removed, never followed.

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(name: str, dir_fd: int | None = None, display: str | None = None) -> int:
    """A real directory's descriptor (never through a final symlink); StoreError otherwise."""
    shown = display or name
    try:
        return os.open(name, _O_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{shown}: missing") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{shown}: not a directory (a symlink or a file), not followed") from None
        raise StoreError(f"{shown}: cannot open the directory: {e.strerror}") from None


def open_beneath(top: str, rel: str, *, create: bool = False) -> tuple[int, list[str]]:
    """(descriptor, replaced) for the directory `top/rel`, reached from `top`
    one level at a time: each level a real directory (never through a
    symlink) on `top`'s device. `top` is the operator's own path, followed.

    With `create`, a missing level is made (0700), and one that is something
    else (a symlink, a file, a FIFO) is removed and made: the levels below
    `top` are ours, so whatever stands there was planted. The paths replaced
    come back, to be said.
    """
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"{top}: cannot open the directory: {e.strerror}") from None
    replaced: list[str] = []
    try:
        device = os.fstat(fd).st_dev
        path = top.rstrip("/")
        for part in (p for p in rel.split("/") if p):
            path = f"{path}/{part}"
            try:
                inner = os.open(part, _O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise StoreError(f"{path}: missing") from None
                _mkdir_at(fd, part, path)
                inner = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not create:
                    raise StoreError(f"{path}: not a directory (a symlink or a file), not followed") from None
                remove_at(fd, part, path)
                replaced.append(path)
                _mkdir_at(fd, part, path)
                inner = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
            if os.fstat(fd).st_dev != device:
                raise StoreError(f"{path}: on another file system (a mount point), not followed")
    except BaseException:
        os.close(fd)
        raise
    return fd, replaced


def _mkdir_at(dir_fd: int, name: str, shown: str) -> None:
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except OSError as e:
        raise StoreError(f"{shown}: cannot create: {e.strerror}") from None


def write_atomic_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644, display: str | None = None) -> None:
    """Replace the entry `name` of the open directory `dir_fd` with `data`, durably.

    A temporary sibling is created with O_EXCL|O_NOFOLLOW, written, fsynced and
    renamed over `name`; then the directory is fsynced. Whatever is found at the
    temporary's name (a crashed run's file, a planted FIFO, symlink or
    directory) is removed first, never opened or reused. On failure the
    temporary is removed and StoreError names the file.
    """
    shown = display or name
    tmp = f"{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, _O_TEMP, mode, dir_fd=dir_fd)
    except FileExistsError:
        remove_at(dir_fd, tmp, f"{shown}.{os.getpid()}.tmp")
        fd = -1
    except OSError as e:
        raise StoreError(f"{shown}.{os.getpid()}.tmp: cannot create: {e.strerror}") from None
    try:
        if fd < 0:
            fd = os.open(tmp, _O_TEMP, mode, dir_fd=dir_fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise StoreError(f"{shown}: cannot write: {e.strerror}") from None
    try:
        os.fsync(dir_fd)
    except OSError as e:
        raise StoreError(f"{shown}: cannot sync its directory: {e.strerror}") from None


def remove_at(dir_fd: int, name: str, display: str | None = None) -> bool:
    """Remove the entry `name` of `dir_fd`, whatever it is; False if there was none.

    A symlink is unlinked (its target untouched); a directory is removed with
    everything in it, descriptor-relative all the way down, never following a
    symlink.
    """
    shown = display or name
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"{shown}: {e.strerror}") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"{shown}: cannot remove: {e.strerror}") from None
    return True


def _remove_tree(dir_fd: int, name: str) -> None:
    fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for child, is_dir in children:
            if is_dir:
                _remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
