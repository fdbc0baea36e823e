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
import posix
import stat

from mobynit.core.errors import StoreError
from mobynit.core.paths import dirname, split

_O_READ = posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC
_O_TEMP = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC


def read_file(path: str, limit: int, dir_fd: int | None = None, display: str | None = None,
              device: int | None = None, base: str | None = None) -> bytes:
    """A regular file's bytes; never follows a final symlink, never blocks on a FIFO;
    on `device` when one is given (its fstat says so: no extra call). Messages name
    `display`, else `base`/`path` (built only when one is said), else `path`."""
    try:
        fd = posix.open(path, _O_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{_shown(path, display, base)}: missing") from None
    except OSError as e:
        raise StoreError(f"{_shown(path, display, base)}: cannot open: {e.strerror}") from None
    try:
        st = posix.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:  # not stat.S_ISREG: a call less per file
            shown = _shown(path, display, base)
            raise StoreError(f"{shown}: not a regular file")
        if device is not None and device != st.st_dev:
            raise StoreError(f"{_shown(path, display, base)}: on another file system (a mount point), not followed")
        if st.st_size > limit:
            raise StoreError(f"{_shown(path, display, base)}: {st.st_size} bytes, more than the {limit} expected")
        data = posix.read(fd, st.st_size + 1)
        if len(data) == st.st_size:
            return data  # the common case: one read
        shown = _shown(path, display, base)
        chunks = [data]
        total = len(data)
        while chunk := posix.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise StoreError(f"{shown}: more than the {limit} bytes expected")
        return b"".join(chunks)
    except OSError as e:
        raise StoreError(f"{_shown(path, display, base)}: cannot read: {e.strerror}") from None
    finally:
        posix.close(fd)


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
                display: str | None = None) -> posix.stat_result:
    """A real directory: not missing, not a symlink, not anything else, and on
    `device` when one is given (no mount point crossed); its lstat. `path` may
    be relative to `dir_fd`, and `display` is then its name in messages."""
    shown = display or path
    try:
        st = posix.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{shown}: missing") from None
    except OSError as e:
        raise StoreError(f"{shown}: {e.strerror}") from None
    return check_dir(st, shown, device)


def check_dir(st: posix.stat_result, shown: str, device: int | None = None) -> posix.stat_result:
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
        return posix.readlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StoreError(f"{shown}: {when_missing}") from None
    except OSError as e:
        raise StoreError(f"{shown}: not a symlink ({e.strerror})") from None


def _kind(path: str, follow: bool) -> int | None:
    """The file type bits of `path` (stat.S_IFMT), None when there is nothing to stat."""
    try:
        return (posix.stat(path) if follow else posix.lstat(path)).st_mode & 0o170000
    except (OSError, ValueError):
        return None


def exists(path: str) -> bool:
    """os.path.exists: symlinks followed."""
    return _kind(path, True) is not None


def lexists(path: str) -> bool:
    """os.path.lexists: a dangling symlink exists."""
    return _kind(path, False) is not None


def is_dir(path: str) -> bool:
    """os.path.isdir: symlinks followed."""
    return _kind(path, True) == stat.S_IFDIR


def is_file(path: str) -> bool:
    """os.path.isfile: symlinks followed."""
    return _kind(path, True) == stat.S_IFREG


def is_link(path: str) -> bool:
    """os.path.islink."""
    return _kind(path, False) == stat.S_IFLNK


def make_dirs(path: str, mode: int = 0o777) -> None:
    """os.makedirs(path, mode, exist_ok=True), step for step: the missing levels
    made (`mode` for the last, the default for those above it); an error when
    what stands at `path` is not a directory."""
    head, tail = split(path)
    if not tail:
        head, tail = split(head)
    if head and tail and not exists(head):
        try:
            make_dirs(head)
        except FileExistsError:
            pass  # made meanwhile, or a dangling symlink: the mkdir below says which
        if tail == ".":
            return
    try:
        posix.mkdir(path, mode)
    except OSError:
        if not is_dir(path):  # EEXIST need not come first (EACCES, EROFS): a directory is all that was asked
            raise


def realpath(path: str) -> str:
    """The path the kernel reaches `path` by, every symlink resolved (as mount(2)
    resolves a mount point); OSError when it does not exist."""
    fd = posix.open(path, posix.O_PATH | posix.O_CLOEXEC)
    try:
        return posix.readlink(f"/proc/self/fd/{fd}")
    finally:
        posix.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`, durably; its directory is opened without following a final symlink."""
    directory, name = split(path)
    dir_fd = open_dir(directory or ".")
    try:
        write_atomic_at(dir_fd, name, data, mode, display=path)
    finally:
        posix.close(dir_fd)




# --- relative to an open directory ------------------------------------------------------
#
# What lives under a root we own (the runtime's state) is reached through the
# descriptor of a directory opened with O_NOFOLLOW|O_DIRECTORY: a symlink
# planted anywhere below it is refused or removed, never followed.

O_DIR = posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW | posix.O_CLOEXEC  # defined once: store, images, workdir and the runtime use it


def open_dir(name: str, dir_fd: int | None = None, display: str | None = None) -> int:
    """A real directory's descriptor (never through a final symlink); StoreError otherwise."""
    shown = display or name
    try:
        return posix.open(name, O_DIR, dir_fd=dir_fd)
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
        fd = posix.open(top, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"{top}: cannot open the directory: {e.strerror}") from None
    replaced: list[str] = []
    try:
        device = posix.fstat(fd).st_dev
        path = top.rstrip("/")
        for part in (p for p in rel.split("/") if p):
            path = f"{path}/{part}"
            try:
                inner = posix.open(part, O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise StoreError(f"{path}: missing") from None
                _mkdir_at(fd, part, path)
                inner = posix.open(part, O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not create:
                    raise StoreError(f"{path}: not a directory (a symlink or a file), not followed") from None
                remove_at(fd, part, path)
                replaced.append(path)
                _mkdir_at(fd, part, path)
                inner = posix.open(part, O_DIR, dir_fd=fd)
            posix.close(fd)
            fd = inner
            if posix.fstat(fd).st_dev != device:
                raise StoreError(f"{path}: on another file system (a mount point), not followed")
    except BaseException:
        posix.close(fd)
        raise
    return fd, replaced


def _mkdir_at(dir_fd: int, name: str, shown: str) -> None:
    try:
        posix.mkdir(name, 0o700, dir_fd=dir_fd)
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
    tmp = f"{name}.{posix.getpid()}.tmp"
    try:
        fd = posix.open(tmp, _O_TEMP, mode, dir_fd=dir_fd)
    except FileExistsError:
        remove_at(dir_fd, tmp, f"{shown}.{posix.getpid()}.tmp")
        fd = -1
    except OSError as e:
        raise StoreError(f"{shown}.{posix.getpid()}.tmp: cannot create: {e.strerror}") from None
    try:
        if fd < 0:
            fd = posix.open(tmp, _O_TEMP, mode, dir_fd=dir_fd)
        view = memoryview(data)
        while view:
            view = view[posix.write(fd, view) :]
        posix.fsync(fd)
        posix.close(fd)
        fd = -1
        posix.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        if fd >= 0:
            posix.close(fd)
        try:
            posix.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise StoreError(f"{shown}: cannot write: {e.strerror}") from None
    try:
        posix.fsync(dir_fd)
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
        st = posix.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"{shown}: {e.strerror}") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(dir_fd, name)
        else:
            posix.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"{shown}: cannot remove: {e.strerror}") from None
    return True


def _remove_tree(dir_fd: int, name: str) -> None:
    fd = posix.open(name, O_DIR, dir_fd=dir_fd)
    try:
        with posix.scandir(fd) as entries:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for child, is_dir in children:
            if is_dir:
                _remove_tree(fd, child)
            else:
                posix.unlink(child, dir_fd=fd)
    finally:
        posix.close(fd)
    posix.rmdir(name, dir_fd=dir_fd)
