"""What a live command works on (docs/live.md): its settings from the options,
the hierarchies it may overlay, the lock that serialises the commands, and
mobynit's own overlays as the kernel's mount table shows them (each one's
mount source is `mobynit-live.<generation>`), and the record beside them.

The mount table, not the record, is the truth about what is merged: an
interrupted command (kill -9) may leave the record pending, never the mounts
unknown.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Sequence

import attrs

from mobynit.core import sysext
from mobynit.core.errors import MobynitError, UsageError, shown
from mobynit.core.mounttable import MountEntry, stack_at
from mobynit.core.record import LIVE_RECORD, LiveRecord, RecordError

SOURCE = "mobynit-live"  # each overlay's mount source: mobynit-live.<generation>
BENEATH_SINCE = (6, 5)
DEFAULT_DATA_STORE = "/mnt/data/docker"  # where boot leaves the data partition's store
LOCK_TIMEOUT = 30.0


class LiveError(MobynitError):
    """A live command that cannot be carried out; one line."""


# --- our overlays in the mount table ---------------------------------------------------------


def is_ours(entry: MountEntry) -> bool:
    return entry.fstype == "overlay" and entry.source.startswith(SOURCE + ".")


def generation_of(entry: MountEntry) -> int | None:
    tail = entry.source[len(SOURCE) + 1 :]
    return int(tail) if tail.isdigit() else None


def ours_on_top(path: str) -> list[MountEntry]:
    """Our overlays stacked at the top of `path`, top first; LiveError when
    someone else's mount covers one of ours (it must go first)."""
    stack = stack_at(path)
    top: list[MountEntry] = []
    for entry in reversed(stack):
        if not is_ours(entry):
            break
        top.append(entry)
    if any(is_ours(e) for e in stack[: len(stack) - len(top)]):
        raise LiveError(f"{path}: another mount ({stack[-1].fstype} {shown(stack[-1].source, 60)}) covers"
                        " mobynit's overlay: unmount it first")
    return top


def beneath_supported(release: str) -> bool:
    """MOVE_MOUNT_BENEATH exists from Linux 6.5 (and may still be refused: then `replace`)."""
    parts = release.split(".")
    try:
        return (int(parts[0]), int("".join(c for c in parts[1][:3] if c.isdigit()) or 0)) >= BENEATH_SINCE
    except (ValueError, IndexError):
        return False


# --- options ------------------------------------------------------------------------------


@attrs.frozen
class Settings:
    """What a live command works on, from its options."""

    root: str
    hierarchies: tuple[str, ...]
    explicit: bool  # hierarchies named on the command line: a missing one is an error
    cmdline: str
    kernel_release: str
    beneath: bool
    data_store: str | None
    boot_record: str | None

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, os.path.dirname(LIVE_RECORD))

    @property
    def record_path(self) -> str:
        return os.path.join(self.root, LIVE_RECORD)

    def at(self, hierarchy: str) -> str:
        return os.path.normpath(self.root.rstrip("/") + hierarchy)


def check_hierarchy(h: str) -> str:
    norm = os.path.normpath(h)
    if not h.startswith("/") or norm in ("/", "//") or "\n" in h:
        raise UsageError(f"--hierarchy {shown(h, 80)}: must be an absolute path below /")
    return norm


def existing_hierarchies(s: Settings) -> list[str]:
    """The hierarchies that are real directories under the root; a named one
    that is not (missing, a symlink, a file) is refused with one line."""
    kept = []
    for h in s.hierarchies:
        path = s.root.rstrip("/")
        problem = None
        for part in h.strip("/").split("/"):
            path = f"{path}/{part}"
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                problem = "missing"
                break
            except OSError as e:
                problem = e.strerror
                break
            if stat.S_ISLNK(st.st_mode):
                problem = "a symlink, not followed"
                break
            if not stat.S_ISDIR(st.st_mode):
                problem = "not a directory"
                break
        if problem is None:
            kept.append(h)
        elif s.explicit or problem != "missing":
            raise LiveError(f"hierarchy {h}: {path} is {problem}" if problem != "missing" else f"hierarchy {h}: {path} is missing")
    return kept


# --- the lock -------------------------------------------------------------------------------


class Lock:
    """`<root>/run/mobynit/live.lock`, held with flock for the whole command; waits at most LOCK_TIMEOUT."""

    def __init__(self, s: Settings) -> None:
        self.path = os.path.join(s.state_dir, "live.lock")
        self.fd = -1

    def __enter__(self) -> Lock:
        from mobynit.core.fileio import open_dir

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise LiveError(f"{os.path.dirname(self.path)}: cannot create: {e.strerror}") from None
        dir_fd = open_dir(os.path.dirname(self.path))
        try:
            self.fd = os.open("live.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                              0o600, dir_fd=dir_fd)
        except OSError as e:
            raise LiveError(f"{self.path}: cannot open the lock: {e.strerror}") from None
        finally:
            os.close(dir_fd)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise LiveError(f"{self.path}: another live command holds the lock for over {LOCK_TIMEOUT:.0f} s") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)



# --- the record and the mounts now ---------------------------------------------------------


def read_record(s: Settings) -> LiveRecord | None:
    try:
        return LiveRecord.read(s.record_path)
    except RecordError:
        return None  # unreadable: the mount table is the truth, and the next write replaces it


def merged_now(s: Settings, hierarchies: Sequence[str]) -> dict[str, list[MountEntry]]:
    return {h: ours for h in hierarchies if (ours := ours_on_top(s.at(h)))}



def settings(args: object) -> Settings:
    root = os.path.abspath(getattr(args, "root") or "/")
    if not os.path.isdir(root):
        raise UsageError(f"--root {root}: no such directory")
    given = getattr(args, "hierarchy")
    hierarchies = tuple(check_hierarchy(h) for h in given.split(",")) if given else sysext.HIERARCHIES
    cmdline = getattr(args, "cmdline", None)
    if cmdline is None:
        try:
            with open("/proc/cmdline", encoding="utf-8", errors="surrogateescape") as f:
                cmdline = f.read()
        except OSError:
            cmdline = ""
    release = getattr(args, "kernel_release", None) or os.uname().release
    no_beneath = getattr(args, "no_beneath", False)
    data_store = getattr(args, "data_store", None)
    if data_store is None and root == "/" and os.path.isdir(DEFAULT_DATA_STORE):
        data_store = DEFAULT_DATA_STORE
    boot_record = getattr(args, "boot_record", None)
    if boot_record is None:
        boot_record = os.path.join(root, "run/mobynit/boot.json")
    return Settings(root=root, hierarchies=hierarchies, explicit=bool(given), cmdline=cmdline, kernel_release=release,
                    beneath=beneath_supported(release) and not no_beneath, data_store=data_store, boot_record=boot_record)
