"""Live layering: `mobynit merge`, `unmerge`, `refresh` and `list` (docs/live.md).

Extensions join the running system without a reboot: one read-only overlay
per hierarchy (/usr, /opt), the extensions' directories above the running
root's own, as systemd-sysext does. Sources are sysext images
(mobynit.core.sysext) and the data store's container extensions that can go
live (`live_verdict`).

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

When the process exits, the private namespace dies and with it every staging
mount; the overlays keep their own references to their layers, and a loop
device goes away with the last mount of its image (autoclear).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence

import attrs

from mobynit.core import labels as label
from mobynit.core import policy, render, syscalls, sysext
from mobynit.core.errors import MobynitError, StoreError, UsageError, shown
from mobynit.core.mounttable import MountEntry, stack_at
from mobynit.core.record import LIVE_RECORD, LiveEntry, LiveRecord, RecordError

SOURCE = "mobynit-live"  # each overlay's mount source: mobynit-live.<generation>
BENEATH_SINCE = (6, 5)
DEFAULT_DATA_STORE = "/mnt/data/docker"  # where boot leaves the data partition's store
LOCK_TIMEOUT = 30.0

CONTAINER = "container"


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


# --- candidates ------------------------------------------------------------------------------


@attrs.frozen
class Candidate:
    """An extension that may be merged: where its tree is (after `open`), and its verdict so far."""

    name: str
    kind: str
    source: str
    fault: str | None = None
    layers: tuple[str, ...] = ()  # a container's layer directories, top first
    override: bool = False
    priority: tuple[int, int, str] = (0, 0, "")


def container_candidates(s: Settings, base_has: Callable[[str], bool]) -> list[Candidate]:
    """The data store's extension containers, each with a verdict: can it go live?"""
    if not s.data_store or not os.path.isdir(s.data_store):
        return []
    from mobynit.core.cmdline import Cmdline
    from mobynit.core.store import Store

    try:
        found = Store(s.data_store).scan(label.is_extension, s.kernel_release)
    except (StoreError, OSError) as e:
        raise LiveError(f"extension store {s.data_store} unreadable: {e}") from None
    booted = _booted_ids(s.boot_record)
    cmdline = Cmdline(s.cmdline)
    host = policy.Host(os_release=sysext.host_release(s.root), architecture=_arch(),
                       strict_os_version=cmdline.flag(policy.CMDLINE_STRICT_OS_VERSION))
    out = []
    for ext in found:
        d = policy.decide(ext, s.kernel_release, cmdline.get(policy.CMDLINE_ABI), host)
        layers = tuple(layer.path for layer in ext.container.layers) if ext.container else ()
        rank = policy.order_key(d)
        fault = d.reason or live_verdict(ext.container.labels if ext.container else {}, layers, s.hierarchies,
                                         d.position == "override", base_has, ext.id in booted)
        out.append(Candidate(name=ext.name, kind=CONTAINER, source=ext.id, fault=fault, layers=layers,
                             override=d.position == "override", priority=(rank[1], rank[2], rank[3])))
    return out


def _arch() -> str:
    from mobynit.core.compat import host_architecture

    return host_architecture()


def _booted_ids(path: str | None) -> set[str]:
    if not path:
        return set()
    from mobynit.core.record import BootRecord

    try:
        return {e.id for e in BootRecord.read(path).included}
    except MobynitError:
        return set()


def live_verdict(labels: dict[str, str] | object, layers: Sequence[str], hierarchies: Sequence[str], override: bool,
                 base_has: Callable[[str], bool], booted: bool) -> str | None:
    """Why a container extension must wait for the next boot, or None if it can go live.

    It can when: its image does not say requires-reboot=true; it is not
    already in the booted root; every file it ships lies under a merged
    hierarchy and none is a whiteout or opaque directory (deletions only
    mean what they mean at boot, inside the root's own stack); and, unless it
    is an override, it replaces no file of the booted root (a normal
    extension sits below the hostapp at boot: it may only add files).
    """
    value = str(labels.get(label.REQUIRES_REBOOT, "")).strip().lower() if isinstance(labels, dict) else ""
    if value in ("1", "true", "yes", "on"):
        return f"{label.REQUIRES_REBOOT}={value}: waits for the next boot"
    if booted:
        return "already in the booted root"
    prefixes = tuple(h.strip("/") + "/" for h in hierarchies)
    ancestors = {p for h in hierarchies for p in _ancestors(h.strip("/"))}
    for layer in layers:
        for rel, st in _walk(layer):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return f"deletes /{shown(rel, 120)} (a whiteout): waits for the next boot"
            if stat.S_ISDIR(st.st_mode):
                if _opaque(os.path.join(layer, rel)):
                    return f"/{shown(rel, 120)} is an opaque directory: waits for the next boot"
                continue
            if not rel.startswith(prefixes) or rel in ancestors:
                return f"ships /{shown(rel, 120)}, outside {', '.join(hierarchies)}: waits for the next boot"
            if not override and base_has(rel):
                return f"would replace /{shown(rel, 120)} of the booted root (only overrides may): waits for the next boot"
    return None


def _ancestors(h: str) -> list[str]:
    parts = h.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _walk(top: str) -> list[tuple[str, os.stat_result]]:
    out: list[tuple[str, os.stat_result]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            names = os.listdir(os.path.join(top, rel) if rel else top)
        except OSError:
            continue
        for name in names:
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(os.path.join(top, r))
            except OSError:
                continue
            out.append((r, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)
    return out


def _opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


# --- building, in a private copy of the mount namespace ----------------------------------------


@attrs.frozen
class Built:
    """What the private namespace produced: a detached overlay per hierarchy, and the verdicts."""

    overlays: dict[str, int]  # hierarchy -> a detached mount's fd
    entries: tuple[LiveEntry, ...]


class Staging:
    """A private tmpfs under `<root>/run/mobynit/live.d`, seen only by this process's namespace copy."""

    def __init__(self, s: Settings) -> None:
        self.dir = os.path.join(s.state_dir, "live.d")
        self.count = 0

    def mount(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        syscalls.mount("mobynit-live-staging", self.dir, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0700")
        os.mkdir(f"{self.dir}/l")
        os.mkdir(f"{self.dir}/img")
        os.mkdir(f"{self.dir}/o")

    def bind(self, path: str) -> str:
        """A short name in the staging directory for a layer directory (read-only bind)."""
        name = str(self.count)
        self.count += 1
        os.mkdir(f"{self.dir}/l/{name}")
        syscalls.mount(path, f"{self.dir}/l/{name}", None, syscalls.MS_BIND)
        return name


def _mount_image(staging: Staging, image: sysext.Image) -> str:
    """A raw image mounted read-only in the staging tmpfs; its directory. MountFailure says why not."""
    target = f"{staging.dir}/img/{len(os.listdir(staging.dir + '/img'))}"
    os.mkdir(target)
    try:
        fd = os.open(image.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"cannot open: {e.strerror}") from None
    try:
        device, dev_fd = syscalls.loop_attach(fd)
        try:
            syscalls.mount(device, target, image.kind, syscalls.MS_RDONLY | syscalls.MS_NODEV | syscalls.MS_NOSUID)
        finally:
            os.close(dev_fd)
    finally:
        os.close(fd)
    return target


def build(s: Settings, hierarchies: Sequence[str], generation: int, log: Callable[[str], None]) -> Built:
    """In a private namespace copy: the overlays for `hierarchies` and every verdict.
    The caller must be in that copy (see `private_namespace`)."""
    for h in hierarchies:
        while ours_on_top(s.at(h)):
            syscalls.umount(s.at(h), syscalls.MNT_DETACH)
    staging = Staging(s)
    staging.mount()
    host = sysext.host_release(s.root)
    arch = _arch()
    from mobynit.core.cmdline import Cmdline

    disabled = Cmdline(s.cmdline).extensions_disabled_by()
    tops: dict[str, str] = {}  # candidate key -> its tree in the namespace
    entries: list[tuple[Candidate, LiveEntry]] = []

    for image in sysext.discover(s.root):
        c = Candidate(name=image.name, kind=image.kind or "image", source=image.path, fault=image.fault)
        warning = None
        if c.fault is None and disabled is not None:
            c = attrs.evolve(c, fault=f"extensions disabled by {shown(disabled)} on the kernel command line")
        if c.fault is None:
            top = image.path
            if image.kind != sysext.DIRECTORY:
                try:
                    top = _mount_image(staging, image)
                except OSError as e:
                    c = attrs.evolve(c, fault=f"{image.path}: the kernel refuses it as {image.kind}"
                                                    f" ({os.strerror(e.errno) if e.errno else e})")
            if c.fault is None:
                has, refusal, warning = sysext.content(top, hierarchies)
                refusal = refusal or sysext.verdict(image.name, top, host, arch)
                if refusal is not None:
                    c = attrs.evolve(c, fault=refusal)
                else:
                    tops[c.source] = top
        entries.append((c, LiveEntry(name=c.name, kind=c.kind, source=c.source, merged=False, hierarchies=(),
                                     reason=c.fault, warning=warning)))

    def base_has(rel: str) -> bool:
        return os.path.lexists(os.path.join(s.root, rel))

    for c in container_candidates(s, base_has) if disabled is None else []:
        entries.append((c, LiveEntry(name=c.name, kind=CONTAINER, source=c.source, merged=False, hierarchies=(),
                                     reason=c.fault, warning=None)))

    # Stacking, top first: override containers by priority, sysext images (the last
    # in version order on top, as systemd-sysext), then normal containers by name.
    kept = [(c, e) for c, e in entries if c.fault is None]
    overrides = sorted((p for p in kept if p[0].kind == CONTAINER and p[0].override), key=lambda p: p[0].priority)
    images = sorted((p for p in kept if p[0].kind != CONTAINER), key=lambda p: sysext.version_key(p[0].name), reverse=True)
    normals = sorted((p for p in kept if p[0].kind == CONTAINER and not p[0].override), key=lambda p: p[0].priority)
    order = overrides + images + normals

    overlays: dict[str, int] = {}
    used: dict[str, list[str]] = {}
    for h in hierarchies:
        lowers: list[str] = []
        for c, _e in order:
            dirs = [f"{layer}{h}" for layer in c.layers] if c.kind == CONTAINER else [tops[c.source] + h]
            dirs = [d for d in dirs if os.path.isdir(d) and not os.path.islink(d)]
            if dirs:
                used.setdefault(c.source, []).append(h)
                lowers += [staging.bind(d) for d in dirs]
        if not lowers:
            continue  # no extension has files here: the hierarchy stays as booted
        lowers.append(staging.bind(s.at(h)))
        target = f"{staging.dir}/o/{len(overlays)}"
        os.mkdir(target)
        options = "lowerdir=" + ":".join(lowers)
        cwd = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.chdir(f"{staging.dir}/l")
            syscalls.mount(f"{SOURCE}.{generation}", target, "overlay", syscalls.MS_RDONLY | syscalls.MS_NODEV, options)
        except OSError as e:
            raise LiveError(f"cannot overlay {h}: {e.strerror or e}"
                            + (" (the root is nested: boot it flat, see docs/design.md)" if e.errno == errno.EINVAL else "")) from None
        finally:
            os.fchdir(cwd)
            os.close(cwd)
        overlays[h] = syscalls.open_tree_clone(target)
    final = []
    for c, e in entries:
        if c.fault is None and c.source in used:
            e = LiveEntry(
                name=e.name, kind=e.kind, source=e.source, merged=True, hierarchies=tuple(used[c.source]),
                reason=None, warning=e.warning)
        elif c.fault is None:
            e = LiveEntry(name=e.name, kind=e.kind, source=e.source, merged=False, hierarchies=(),
                          reason=f"has no files under {', '.join(hierarchies) or 'any hierarchy'}", warning=e.warning)
        final.append(e)
    for e in final:
        if e.warning and e.merged:
            log(f"{e.name}: {e.warning}")
    return Built(overlays=overlays, entries=tuple(final))


class private_namespace:
    """Enter a private copy of this process's mount namespace; leave it (back to the original) on exit.

    Mounts made inside never propagate out (everything is made private first).
    The copy dies when left, taking its staging mounts with it."""

    def __enter__(self) -> private_namespace:
        self.original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.cwd = os.getcwd()
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        return self

    def __exit__(self, *exc: object) -> None:
        syscalls.setns(self.original, syscalls.CLONE_NEWNS)
        os.close(self.original)
        try:
            os.chdir(self.cwd)
        except OSError:
            os.chdir("/")


# --- the commands ---------------------------------------------------------------------------


def read_record(s: Settings) -> LiveRecord | None:
    try:
        return LiveRecord.read(s.record_path)
    except RecordError:
        return None  # unreadable: the mount table is the truth, and the next write replaces it


def merged_now(s: Settings, hierarchies: Sequence[str]) -> dict[str, list[MountEntry]]:
    return {h: ours for h in hierarchies if (ours := ours_on_top(s.at(h)))}


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


def cmd_merge(args: object) -> int:
    s = settings(args)
    log = _log(getattr(args, "quiet", False))

    def run() -> int:
        rec = apply(s, "merge", log)
        _emit(args, rec, render.live(rec))
        return 0
    return _guard(run)


def cmd_refresh(args: object) -> int:
    s = settings(args)
    log = _log(getattr(args, "quiet", False))

    def run() -> int:
        rec = apply(s, "refresh", log)
        _emit(args, rec, render.live(rec))
        return 0
    return _guard(run)


def cmd_unmerge(args: object) -> int:
    s = settings(args)
    log = _log(getattr(args, "quiet", False))

    def run() -> int:
        rec = unmerge(s, log)
        _emit(args, rec, render.live(rec))
        return 0
    return _guard(run)


def cmd_list(args: object) -> int:
    s = settings(args)

    def run() -> int:
        rec = candidates_report(s)
        _emit(args, rec, render.live(rec, would=True))
        return 0
    return _guard(run)
