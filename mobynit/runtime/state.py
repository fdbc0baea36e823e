"""What the runtime remembers of each container, and the lock that guards it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat

from mobynit.core.errors import StoreError, UsageError, shown
from mobynit.core.fileio import O_DIR, open_dir, read_file, remove_at, write_atomic_at
from mobynit.core.model import Record
from mobynit.runtime import OCI_VERSION, RuntimeFailure
from mobynit.runtime.hooks import hook_env
from mobynit.runtime.proxy import proc_stat
from mobynit.runtime.spec import parse_json, string_map

CREATED = "created"
STOPPED = "stopped"
STATE_LIMIT = 1 << 20
# O_NONBLOCK: a FIFO planted at the lock's name is refused (ENXIO), never waited on.
_O_LOCK = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class State(Record):
    """What the runtime remembers of one container, in `<root>/<id>/state.json`.

    The file is the OCI state (what `state` prints) plus, under "mobynit",
    what later steps need without the bundle: the proxy's start time (so a
    recycled pid is never signalled) and the extension's volumes.
    """

    __slots__ = ("id", "status", "pid", "proxy_start", "bundle", "rootfs", "created", "labels", "volumes")
    id: str
    status: str
    pid: int
    proxy_start: int
    bundle: str
    rootfs: str
    created: str
    labels: dict[str, str]
    volumes: dict[str, str]

    def hook_env(self) -> dict[str, str]:
        return hook_env(self.rootfs, self.labels, self.volumes)

    def proxy_alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[0] not in ("Z", "X", "x") and st[1] == self.proxy_start

    def current_status(self) -> str:
        """`created` while the proxy waits; once it is gone, however it went, `stopped`."""
        if self.status == CREATED and not self.proxy_alive():
            return STOPPED
        return self.status

    def oci(self) -> dict:
        status = self.current_status()
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": status,
            "pid": self.pid if status == CREATED else 0,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": self.labels,
        }

    def to_json(self) -> bytes:
        doc = self.oci()
        doc.update(status=self.status, pid=self.pid)
        doc["mobynit"] = {"proxyStart": self.proxy_start, "volumes": self.volumes}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, path: str) -> State:
        doc = parse_json(raw, path, "state file")
        try:
            private = doc["mobynit"]
            state = cls(
                id=doc["id"],
                status=doc["status"],
                pid=doc["pid"],
                proxy_start=private["proxyStart"],
                bundle=doc["bundle"],
                rootfs=doc["rootfs"],
                created=doc["created"],
                labels=string_map(doc["annotations"], f"state file {path}: annotations"),
                volumes=string_map(private["volumes"], f"state file {path}: volumes"),
            )
        except (KeyError, TypeError) as e:
            raise RuntimeFailure(f"state file {path} lacks field {e}") from None
        numbers = (state.pid, state.proxy_start)
        if state.status not in (CREATED, STOPPED) or not all(type(n) is int for n in numbers):
            raise RuntimeFailure(f"state file {path} has a bad status or pid")
        return state


def valid_id(cid: str) -> str:
    """Container ids become path names: refuse what could leave the root (runc's rule)."""
    if not cid or cid in (".", "..") or not all(c.isascii() and (c.isalnum() or c in "_+-.") for c in cid):
        raise UsageError(f"invalid container id {shown(cid)!r}: only letters, digits and _+-. are allowed")
    return cid


class StateDir:
    """One container's directory under the runtime root, held under its lock.

    Nothing under the root is ever reached by path: the root is opened with
    O_NOFOLLOW|O_DIRECTORY and every entry below it (`<id>.lock`, `<id>/`,
    `<id>/state.json`) is opened, written and removed relative to a
    directory descriptor, so a symlink planted there is refused or removed,
    never followed.

    The lock is a file beside the state directory, `<root>/<id>.lock`; delete
    unlinks it while still holding it, so a waiter that then gets the lock
    checks it still holds the file at that name and retries otherwise. A lock
    name that is not a regular file (a planted symlink, FIFO or directory) is
    removed and made anew: it is ours.
    """

    def __init__(self, root: str, cid: str) -> None:
        self.root = root
        self.id = valid_id(cid)
        self.dir = f"{root}/{cid}"
        self.state_path = f"{self.dir}/state.json"
        self.lock_name = f"{cid}.lock"
        self.lock_path = f"{root}/{self.lock_name}"
        self.root_fd = -1
        self.lock_fd = -1

    def __enter__(self) -> StateDir:
        try:
            os.makedirs(self.root, mode=0o711, exist_ok=True)
        except OSError as e:
            raise RuntimeFailure(f"cannot create the runtime root {self.root}: {e.strerror}") from None
        try:
            self.root_fd = open_dir(self.root, display=f"runtime root {self.root}")
        except StoreError as e:
            raise RuntimeFailure(str(e)) from None
        try:
            self.lock_fd = self._lock()
        except BaseException:
            os.close(self.root_fd)
            self.root_fd = -1
            raise
        return self

    def _lock(self) -> int:
        for _ in range(100):
            try:
                fd = os.open(self.lock_name, _O_LOCK, 0o600, dir_fd=self.root_fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK):
                    raise RuntimeFailure(f"cannot open the lock {self.lock_path}: {e.strerror}") from None
                self._remove(self.lock_name)  # a symlink or directory planted at our name
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                self._remove(self.lock_name)  # a FIFO or device planted at our name
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.lock_name, dir_fd=self.root_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise RuntimeFailure(f"cannot take the lock {self.lock_path}: it keeps being replaced")

    def __exit__(self, *exc: object) -> None:
        """Release the lock; a container with no state (deleted, or never
        created) leaves nothing behind, not even its lock file."""
        try:
            if not self.exists():
                try:
                    os.unlink(self.lock_name, dir_fd=self.root_fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(self.lock_fd)
            os.close(self.root_fd)
            self.lock_fd = self.root_fd = -1

    def _remove(self, name: str) -> bool:
        try:
            return remove_at(self.root_fd, name, f"{self.root}/{name}")
        except StoreError as e:
            raise RuntimeFailure(str(e)) from None

    def _open_dir(self) -> int | None:
        """The container directory's descriptor; None when there is none, or
        something else (a symlink, a file) sits at its name."""
        try:
            return os.open(self.id, O_DIR, dir_fd=self.root_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return None
            raise RuntimeFailure(f"cannot open the state directory {self.dir}: {e.strerror}") from None

    def exists(self) -> bool:
        """A state file in a real state directory (what an interrupted create
        or a planted entry leaves is not a container)."""
        fd = self._open_dir()
        if fd is None:
            return False
        try:
            os.stat("state.json", dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def load(self) -> State:
        fd = self._open_dir()
        if fd is None:
            raise RuntimeFailure(f"container {self.id} does not exist")
        try:
            raw = read_file("state.json", STATE_LIMIT, dir_fd=fd, display=self.state_path)
        except StoreError as e:
            if str(e).endswith(": missing"):
                raise RuntimeFailure(f"container {self.id} does not exist") from None
            raise RuntimeFailure(f"state file {e}") from None
        finally:
            os.close(fd)
        return State.from_json(raw, self.state_path)

    def save(self, state: State) -> None:
        try:
            os.mkdir(self.id, 0o711, dir_fd=self.root_fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise RuntimeFailure(f"cannot create the state directory {self.dir}: {e.strerror}") from None
        fd = self._open_dir()
        if fd is None:  # a symlink or file planted at our name, with no state: replaced, never followed
            self._remove(self.id)
            try:
                os.mkdir(self.id, 0o711, dir_fd=self.root_fd)
            except OSError as e:
                raise RuntimeFailure(f"cannot create the state directory {self.dir}: {e.strerror}") from None
            fd = self._open_dir()
            if fd is None:
                raise RuntimeFailure(f"{self.dir} keeps being replaced by something other than a directory")
        try:
            write_atomic_at(fd, "state.json", state.to_json(), display=self.state_path)
        except StoreError as e:
            raise RuntimeFailure(str(e)) from None
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Forget the container, whatever sits at its name: the state file first
        (the commit point), then everything else. A symlink is unlinked, never
        followed; a directory is emptied through descriptors."""
        fd = self._open_dir()
        if fd is not None:
            try:
                remove_at(fd, "state.json", self.state_path)
            except StoreError as e:
                raise RuntimeFailure(str(e)) from None
            finally:
                os.close(fd)
        self._remove(self.id)
        try:
            os.fsync(self.root_fd)
        except OSError as e:
            raise RuntimeFailure(f"cannot sync the runtime root {self.root}: {e.strerror}") from None
