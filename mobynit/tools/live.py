"""Live layering: `mobynit merge`, `unmerge`, `refresh` and `list` (docs/live.md).

Extensions join the running system without a reboot: one read-only overlay
per hierarchy (/usr, /opt), the extensions' directories above the running
root's own, as systemd-sysext does. Sources are sysext images
(mobynit.core.sysext) and the data store's container extensions that can go
live (mobynit.tools.live_sources).

How a merge is built, and why that way:

1. under a lock (`<root>/run/mobynit/live.lock`), so two commands never interleave;
2. the process enters a private copy of its mount namespace, where nothing
   propagates back. There it detaches the overlays it merged earlier, which
   shows the base (the booted view) again *in that copy only*, mounts the
   images (loop devices, read-only) on a private tmpfs and builds the new
   overlays from them: nobody else sees any of this;
3. it keeps a detached copy of each new overlay (open_tree), returns to the
   original namespace and puts them in place: beneath the old overlay and
   then detaches the old one (MOVE_MOUNT_BENEATH, Linux >= 6.5), so no
   process ever sees the hierarchy without its extensions; on older
   kernels the old overlay is detached first, so for a moment the hierarchy
   is its booted self. In no case is it missing its base files: its base
   is never unmounted, only covered.
4. the record (`<root>/run/mobynit/live.json`) says what is merged, what was
   refused and why. It is written "pending" before step 3 and "merged" after:
   an interrupted command (kill -9) leaves a pending record, and each
   overlay's mount source (`mobynit-live.<generation>`) tells what happened.

This module holds the commands and step 3 (putting overlays in place); the
others are live_state (settings, lock, our overlays in the mount table, the
record), live_sources (which container extensions can go live) and
live_build (step 2). They import in that order, never back.

When the process exits, the private namespace dies and with it every staging
mount; the overlays keep their own references to their layers, and a loop
device goes away with the last mount of its image (autoclear).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Sequence

from mobynit.core import render, syscalls
from mobynit.core.mounttable import MountEntry
from mobynit.core.record import LiveEntry, LiveRecord
from mobynit.tools.live_build import build, private_namespace
from mobynit.tools.live_state import (LiveError, Lock, Settings, existing_hierarchies, generation_of, merged_now,
                                      ours_on_top, read_record, settings)


# --- the commands ---------------------------------------------------------------------------


def apply(s: Settings, mode: str, log: Callable[[str], None]) -> LiveRecord:
    """merge (refused when merged with another set) or refresh (replace whatever is merged)."""
    with Lock(s):
        hierarchies = existing_hierarchies(s)
        now = merged_now(s, hierarchies)
        previous = read_record(s)
        last = max([previous.generation if previous else 0]
                   + [g for ours in now.values() for e in ours if (g := generation_of(e)) is not None])
        generation = last + 1
        with private_namespace():
            built = build(s, hierarchies, generation, log)
        try:
            new_set = sorted((e.kind, e.source) for e in built.entries if e.merged)
            if mode == "merge" and now:
                old_set = sorted((e.kind, e.source) for e in previous.extensions if e.merged) if previous else None
                if previous is not None and previous.state == "merged" and old_set == new_set:
                    log(f"already merged ({len(new_set)} extension{'s' if len(new_set) != 1 else ''}); nothing changed")
                    return previous
                raise LiveError(f"{', '.join(sorted(now))} already merged"
                                f" ({'another set of extensions' if previous else 'by an interrupted command'}):"
                                " use `mobynit refresh` to replace it, or `mobynit unmerge`")
            pending = LiveRecord(generation=generation, state="pending", hierarchies=tuple(built.overlays),
                                 mechanism="none", extensions=built.entries)
            pending.write(s.record_path)
            mechanism = _put_in_place(s, hierarchies, built.overlays, log)
            done = pending.replace(state="merged" if built.overlays else "unmerged", mechanism=mechanism)
            done.write(s.record_path)
            return done
        finally:
            for fd in built.overlays.values():
                os.close(fd)


def _put_in_place(s: Settings, hierarchies: Sequence[str], overlays: dict[str, int], log: Callable[[str], None]) -> str:
    """Attach each new overlay, replacing ours: beneath then detach the old (no window), or
    detach then attach (the booted view for a moment). Returns the mechanism used."""
    used = "attach"
    for h in hierarchies:
        path = s.at(h)
        ours = ours_on_top(path)
        fd = overlays.get(h)
        if fd is None:
            for _ in ours:
                syscalls.umount(path, syscalls.MNT_DETACH)
            continue
        if not ours:
            syscalls.move_mount(fd, path)
            continue
        while len(ours) > 1:  # an interrupted command's extra overlay: our older ones go first
            syscalls.umount(path, syscalls.MNT_DETACH)
            ours = ours_on_top(path)
        if s.beneath:
            try:
                syscalls.move_mount(fd, path, beneath=True)
                syscalls.umount(path, syscalls.MNT_DETACH)
                used = "beneath"
                continue
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise LiveError(f"cannot replace the overlay on {path}: {e.strerror}") from None
                log(f"warning: {path}: the kernel refuses MOVE_MOUNT_BENEATH ({e.strerror}); replacing instead")
        syscalls.umount(path, syscalls.MNT_DETACH)
        syscalls.move_mount(fd, path)
        used = "replace" if used != "beneath" else used
    return used


def unmerge(s: Settings, log: Callable[[str], None]) -> LiveRecord:
    with Lock(s):
        hierarchies = existing_hierarchies(s)
        now = merged_now(s, hierarchies)
        previous = read_record(s)
        if not now:
            log(f"nothing merged on {', '.join(hierarchies) or 'any hierarchy'}; nothing changed")
        for h, ours in now.items():
            for _ in ours:
                syscalls.umount(s.at(h), syscalls.MNT_DETACH)
        entries = tuple(LiveEntry(name=e.name, kind=e.kind, source=e.source, merged=False, hierarchies=(),
                                  reason="unmerged", warning=None)
                        for e in (previous.extensions if previous else ()) if e.merged)
        rec = LiveRecord(generation=previous.generation if previous else 0, state="unmerged", hierarchies=(),
                         mechanism="none", extensions=entries)
        if now or previous is not None:
            rec.write(s.record_path)
        return rec


def status(s: Settings) -> tuple[LiveRecord | None, dict[str, list[MountEntry]], str | None]:
    """(record, our overlays now, a line when the two disagree)."""
    hierarchies = [h for h in s.hierarchies if os.path.isdir(s.at(h))]
    now = merged_now(s, hierarchies)
    rec = read_record(s)
    note = None
    gens = {generation_of(e) for ours in now.values() for e in ours}
    if rec is None and now:
        note = "overlays of mobynit are merged but no record says which: run `mobynit refresh` or `mobynit unmerge`"
    elif rec is not None and rec.state == "pending":
        if gens == {rec.generation} and set(now) == set(rec.hierarchies):
            note = "the last command was interrupted after its overlays were in place: the record below holds"
        else:
            note = "the last command was interrupted: run `mobynit refresh` (or `unmerge`) to get to a known state"
    elif rec is not None and rec.state == "merged" and (gens != {rec.generation} or set(now) != set(rec.hierarchies)):
        note = "the mount table no longer matches the record: run `mobynit refresh` (or `unmerge`)"
    elif rec is not None and rec.state == "unmerged" and now:
        note = "overlays of mobynit are merged although the record says unmerged: run `mobynit unmerge`"
    return rec, now, note


def candidates_report(s: Settings) -> LiveRecord:
    """What a merge would do now, without changing anything (`list`): built in a private namespace and dropped."""
    hierarchies = existing_hierarchies(s)
    with private_namespace():
        built = build(s, hierarchies, 0, lambda line: None)
    for fd in built.overlays.values():
        os.close(fd)
    return LiveRecord(generation=0, state="candidates", hierarchies=tuple(built.overlays), mechanism="none",
                      extensions=built.entries)


def _log(quiet: bool) -> Callable[[str], None]:
    def log(line: str) -> None:
        if not quiet:
            print(f"mobynit: {line}", file=sys.stderr)
    return log


def _emit(args: object, rec: LiveRecord | None, lines: list[str]) -> None:
    if getattr(args, "json", False):
        json.dump(rec.as_json() if rec is not None else None, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(f"{line}\n" for line in lines))


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except OSError as e:
        raise LiveError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None


def _changing(args: object, change: Callable[[Settings, Callable[[str], None]], LiveRecord]) -> int:
    """Run a command that changes what is merged, then say what is merged now."""
    s = settings(args)
    log = _log(getattr(args, "quiet", False))

    def run() -> int:
        rec = change(s, log)
        _emit(args, rec, render.live(rec))
        return 0
    return _guard(run)


def cmd_merge(args: object) -> int:
    return _changing(args, lambda s, log: apply(s, "merge", log))


def cmd_refresh(args: object) -> int:
    return _changing(args, lambda s, log: apply(s, "refresh", log))


def cmd_unmerge(args: object) -> int:
    return _changing(args, unmerge)


def cmd_list(args: object) -> int:
    s = settings(args)

    def run() -> int:
        rec = candidates_report(s)
        _emit(args, rec, render.live(rec, would=True))
        return 0
    return _guard(run)
