"""Which partitions boot trusts: the root by its name, the data partition
only from the root partition's disk.

balenaOS binds its partitions to the disk it booted from with udev rules;
this initramfs has no udev, so the rule is here. Without it a USB stick
carrying a partition labelled `resin-data` (or `resin-rootA`) would be taken
in place of the device's own, by device-name order. The rules (docs/boot.md,
"Which partitions are trusted"):

- root: `root=` must name exactly one partition. Several matches are never
  guessed between: systemd-boot's LoaderDevicePartUUID (the partition the
  loader itself came from) picks the one on that disk; without the hint boot
  refuses, naming the candidates.
- data by label (the default `LABEL=resin-data`, or `PARTLABEL=`): only
  partitions of the root partition's disk qualify; a match elsewhere is named
  on the console and never used. Once that disk's partition table is all
  there, the answer is known: no waiting for what cannot come.
- data by UUID=, PARTUUID= or a /dev path: the operator's explicit choice,
  honoured on any disk (the root's disk first when several carry it).
"""

from __future__ import annotations

import posix
import time

from mobynit.core.fileio import exists, is_dir
from mobynit.core.model import Record
from mobynit.core.paths import dirname, join
from mobynit.initrd import blockdev
from mobynit.initrd.blockdev import DeviceSpec, Part, Snapshot

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

EFI = "/sys/firmware/efi"
EFIVARS = "/sys/firmware/efi/efivars"
# systemd's boot loader interface: the GPT partition the loader was read from.
LOADER_PARTUUID = "LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EXPLICIT = ("UUID", "PARTUUID", "PATH")  # names an operator gives one partition


class Choice(Record):
    """The partition chosen (part), or why none is (why); `ignored` are
    partitions that carry the name but are not trusted, to be named."""

    __slots__ = ("part", "why", "ignored")
    part: Part | None
    why: str | None
    ignored: tuple[Part, ...]


PENDING = None  # a decision that may change when more devices appear


def names(parts: list[Part] | tuple[Part, ...]) -> str:
    return ", ".join(p.where() for p in parts)


def choose_root(snap: Snapshot, spec: DeviceSpec, hint: str | None, final: bool) -> Choice | None:
    """The root partition `spec` names, or None while it may still appear.

    `hint` is the loader's partition (LoaderDevicePartUUID), lower case.
    """
    found = snap.matches(spec)
    if hint is not None:
        loader = next((p for p in snap.parts if p.number is not None and snap.partuuid(p) == hint), None)
        if loader is not None:
            on = [p for p in found if p.disk == loader.disk]
            if len(on) == 1:
                return _root(snap, on[0], found)
            if len(on) > 1:
                return Choice(None, f"root partition {spec} is ambiguous on the boot loader's disk "
                              f"{loader.disk}: {names(on)}; not guessing", ())
            if snap.missing(loader.disk) and not final:
                return PENDING  # it may be still to come on the loader's disk
        elif not final:
            return PENDING  # the loader's own disk is not there yet: wait for it
    if len(found) == 1:
        return _root(snap, found[0], found)
    if len(found) > 1:
        return Choice(None, f"root partition {spec} is ambiguous: {names(found)}; not guessing "
                      "(name it by PARTUUID= or UUID=, or boot through systemd-boot)", ())
    return PENDING


def _root(snap: Snapshot, root: Part, found: list[Part]) -> Choice:
    """The root chosen; ignored: the other matches, and partitions on other
    disks whose file system carries the root's label (a planted `resin-rootA`),
    so the console names them even when root= gave a PARTUUID."""
    ident = snap.ext(root)
    twins = [p for p in snap.parts if p.disk != root.disk and ident is not None
             and p.number is not None and snap.ext(p) is not None and snap.ext(p)[0] == ident[0]]
    ignored = [p for p in found if p != root]
    return Choice(root, None, tuple(ignored + [p for p in twins if p not in ignored]))


def choose_data(snap: Snapshot, spec: DeviceSpec, root: Part, final: bool) -> Choice | None:
    """The data partition `spec` names, trusted only as the module says; None
    while it may still appear."""
    found = [p for p in snap.matches(spec) if p.name != root.name]
    on = [p for p in found if p.disk == root.disk]
    elsewhere = tuple(p for p in found if p.disk != root.disk)
    if len(on) == 1:
        return Choice(on[0], None, elsewhere)
    if len(on) > 1:
        return Choice(None, f"data partition {spec} is ambiguous on disk {root.disk}: {names(on)}", elsewhere)
    if spec.key in EXPLICIT:
        if len(elsewhere) == 1:
            return Choice(elsewhere[0], None, ())  # named by the operator: honoured on any disk
        if elsewhere:
            return Choice(None, f"data partition {spec} is ambiguous: {names(elsewhere)}", ())
        return PENDING  # may be on a disk still to come
    missing = snap.missing(root.disk)
    if missing and not final:
        return PENDING
    why = f"no partition of disk {root.disk} (the root partition's) carries {spec}"
    unreadable = [p.name for p in snap.on_disk(root.disk) if p.name != root.name and snap.ext(p) is None]
    if spec.key == "LABEL" and unreadable:
        why += f" ({', '.join(unreadable)}: no ext2/3/4 file system)"
    if missing:
        why += f"; its partition table lists partition {', '.join(map(str, missing))}, which never appeared"
    return Choice(None, why, elsewhere)


def settle(decide: Callable[[Snapshot, bool], Choice | None], timeout: float, what: str,
           log: Callable[[str], None], sys_block: str = blockdev.SYS_BLOCK, dev: str = "/dev") -> tuple[Choice, float]:
    """Decide on what the kernel shows now; while the decision is pending, sleep
    until the kernel announces a block device and decide again, until `timeout`.

    Returns (the choice, seconds waited). A choice still pending at the
    deadline becomes "did not appear".
    """
    start = time.monotonic()
    choice = decide(Snapshot(sys_block, dev), False)
    if choice is not None:
        return choice, 0.0
    waiter = None
    try:
        waiter = blockdev.UeventWaiter()
    except OSError as e:
        log(f"cannot listen for kernel uevents ({e.strerror}): not waiting for {what}")
    try:
        if waiter is not None:
            log(f"waiting up to {timeout:g} s for {what}")
            deadline = start + timeout
            while choice is None:
                # Look again after opening the socket: nothing announced in between is lost.
                choice = decide(Snapshot(sys_block, dev), False)
                if choice is None and not waiter.wait(deadline):
                    break
        if choice is None:
            choice = decide(Snapshot(sys_block, dev), True)  # the last look
    finally:
        if waiter is not None:
            waiter.close()
    waited = time.monotonic() - start
    if choice is None:
        choice = Choice(None, f"{what} did not appear within {waited:.1f} s", ())
    return choice, waited


def loader_partuuid(efivars: str = EFIVARS) -> str | None:
    """systemd-boot's LoaderDevicePartUUID, lower case; None when the machine
    did not boot through a loader that sets it (or not by EFI at all).

    efivarfs is mounted read-only for the look and let go again when /init
    had not mounted it: the booted system mounts it as it wants.
    """
    if not is_dir(EFI if efivars == EFIVARS else dirname(efivars)):
        return None
    path = join(efivars, LOADER_PARTUUID)
    mounted = False
    if not exists(path) and efivars == EFIVARS:
        from mobynit.core import syscalls

        try:
            if posix.listdir(efivars):
                return None  # efivarfs is there, without the variable: not systemd-boot
            syscalls.mount("efivarfs", efivars, "efivarfs",
                           syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
            mounted = True
        except OSError:
            return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4 + 2 * 64)  # 4 bytes of attributes, then UTF-16LE text with a NUL
    except OSError:
        return None
    finally:
        if mounted:
            from mobynit.core import syscalls

            syscalls.umount(efivars, syscalls.MNT_DETACH)
    text = raw[4:].decode("utf-16-le", "replace").split("\0", 1)[0].strip().lower()
    return text if len(text) == 36 and text.count("-") == 4 else None
