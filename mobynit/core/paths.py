"""Where things are: the stores on the partitions, and where boot puts its work.

balenaOS's places are the defaults; each store location can be given
instead, for tests, image builders and other systems.
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
