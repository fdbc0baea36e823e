"""What the runtime remembers of each container, and the lock that guards it."""

from __future__ import annotations

import fcntl
import json
import os

from mobynit.core.errors import UsageError, shown
from mobynit.core.fileio import fsync_dir, write_atomic
from mobynit.core.model import Record
from mobynit.runtime import OCI_VERSION, RuntimeFailure
from mobynit.runtime.hooks import hook_env
from mobynit.runtime.proxy import proc_stat
from mobynit.runtime.spec import read_json, string_map

CREATED = "created"
STOPPED = "stopped"


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
    def from_json(cls, path: str) -> State:
        doc = read_json(path, "state file", 1 << 20)
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

    The lock is a file beside the state directory, `<root>/<id>.lock`; delete
    unlinks it while still holding it, so a waiter that then gets the lock
    checks it still holds the file at that path and retries otherwise.
    """

    def __init__(self, root: str, cid: str) -> None:
        self.root = root
        self.id = valid_id(cid)
        self.dir = f"{root}/{cid}"
        self.state_path = f"{self.dir}/state.json"
        self.lock_path = f"{root}/{cid}.lock"
        self.lock_fd = -1

    def __enter__(self) -> StateDir:
        try:
            os.makedirs(self.root, mode=0o711, exist_ok=True)
        except OSError as e:
            raise RuntimeFailure(f"cannot create the runtime root {self.root}: {e.strerror}") from None
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.lock_fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        """Release the lock; a container with no state (deleted, or never
        created) leaves nothing behind, not even its lock file."""
        try:
            if not self.exists():
                os.unlink(self.lock_path)
        finally:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def exists(self) -> bool:
        return os.path.exists(self.state_path)

    def load(self) -> State:
        if not self.exists():
            raise RuntimeFailure(f"container {self.id} does not exist")
        return State.from_json(self.state_path)

    def save(self, state: State) -> None:
        os.makedirs(self.dir, mode=0o711, exist_ok=True)
        write_atomic(self.state_path, state.to_json())

    def remove(self) -> None:
        """Forget the container: the state file first (the commit point), then its directory."""
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                os.unlink(f"{self.dir}/{name}")  # a crashed write's temp file
            os.rmdir(self.dir)
        fsync_dir(self.root)
