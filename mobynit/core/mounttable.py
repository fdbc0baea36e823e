"""The mount table as the kernel shows it (/proc/self/mountinfo): one reader for every caller.

Boot asks it whether a target already has a root on it and what an
interrupted run left in the work directory; live layering asks which
overlays stack at /usr and whose they are.
"""

from __future__ import annotations

from mobynit.core.fileio import realpath
from mobynit.core.model import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

MOUNTINFO = "/proc/self/mountinfo"


class MountEntry(Record):
    """One line of mountinfo: the mount, its parent, where, what and from what."""

    __slots__ = ("mount_id", "parent_id", "mount_point", "fstype", "source")
    mount_id: int
    parent_id: int
    mount_point: str
    fstype: str
    source: str


def mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    entries = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]), mount_point=_unescape(fields[4]),
            fstype=tail[0] if tail else "", source=_unescape(tail[1]) if len(tail) > 1 else "",
        ))
    return entries


def mount_points() -> list[str]:
    return [m.mount_point for m in mountinfo()]


def is_mount_point(path: str) -> bool:
    """Whether anything is mounted at `path` (symlinks resolved, as mount(2) resolves them)."""
    table = mount_points()  # first: without /proc, this says so (realpath reads /proc/self/fd too)
    try:
        where = realpath(path)
    except OSError:
        return False  # nothing can be mounted where nothing is
    return where in table


def stack_at(path: str, table: Sequence[MountEntry] | None = None) -> list[MountEntry]:
    """The mounts at exactly `path`, bottom first (each stacked mount's parent is the one below)."""
    here = [m for m in (mountinfo() if table is None else table) if m.mount_point == path]
    ids = {m.mount_id for m in here}
    bottom = [m for m in here if m.parent_id not in ids]
    ordered: list[MountEntry] = []
    while bottom:
        ordered.append(bottom[0])
        bottom = [m for m in here if m.parent_id == bottom[0].mount_id]
    return ordered


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field) >= i + 4 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
