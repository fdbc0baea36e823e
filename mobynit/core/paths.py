"""Where things are: the stores on the partitions, and where boot puts its work.

balenaOS's places are the defaults; each store location can be given
instead, for tests, image builders and other systems.

Also the boot path's path arithmetic (split, join, dirname, basename, normpath),
as posixpath computes it: the boot path does without the `os` module, whose
import (its Python layer and _collections_abc) costs about 1 ms of every
boot; the system calls themselves come from `posix`, which is built in.
"""

from __future__ import annotations

from mobynit.core.model import Record

DEFAULT_TARGET = "/sysroot"  # outside /run, which boot moves into the new root
DEFAULT_WORKDIR = "/run/mobynit/work"
HOSTAPP_STORE = "balena"  # on the root partition
DATA_STORE = "docker"  # on the data partition
IMAGES = "extensions"  # on the data partition: sysext images that join the root at boot (mobynit.core.images)
PURGE_MARKER = "remove_me_to_reset"  # on the data partition: its absence means a data reset is pending
ACTIVE_SYSROOT = "/mnt/sysroot/active"  # where boot leaves the root partition in the new root


class StorePaths(Record):
    """The two stores, the data partition's sysext images and its reset marker."""

    __slots__ = ("sysroot", "hostapp_store", "data", "data_store", "purge_marker", "images")
    _defaults = {"images": None}
    sysroot: str
    hostapp_store: str
    data: str | None
    data_store: str | None
    purge_marker: str | None
    images: str | None


def store_paths(
    sysroot: str,
    data: str | None = None,
    *,
    hostapp_store: str | None = None,
    data_store: str | None = None,
    purge_marker: str | None = None,
    images: str | None = None,
) -> StorePaths:
    sysroot = sysroot.rstrip("/") or "/"
    if data is not None:
        data = data.rstrip("/") or "/"
    return StorePaths(
        sysroot=sysroot,
        hostapp_store=hostapp_store or f"{sysroot}/{HOSTAPP_STORE}",
        data=data,
        data_store=data_store or (f"{data}/{DATA_STORE}" if data else None),
        purge_marker=purge_marker or (f"{data}/{PURGE_MARKER}" if data else None),
        images=images or (f"{data}/{IMAGES}" if data else None),
    )


def split(path: str) -> tuple[str, str]:
    """(directory, last name), as os.path.split gives them."""
    cut = path.rfind("/") + 1
    head, tail = path[:cut], path[cut:]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head, tail


def join(path: str, *names: str) -> str:
    """`names` appended to `path` one by one, an absolute one starting afresh, as os.path.join."""
    for name in names:
        if name.startswith("/"):
            path = name
        elif not path or path.endswith("/"):
            path += name
        else:
            path += "/" + name
    return path


def dirname(path: str) -> str:
    return split(path)[0]


def basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def normpath(path: str) -> str:
    """`path` with `.`, `..` and repeated slashes resolved by their names alone, as os.path.normpath."""
    if not path:
        return "."
    lead = 2 if path.startswith("//") and not path.startswith("///") else 1 if path.startswith("/") else 0
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part != ".." or (not lead and not parts) or (parts and parts[-1] == ".."):
            parts.append(part)
        elif parts:
            parts.pop()
    return "/" * lead + "/".join(parts) or "."
