"""Building the live overlays where nobody sees them (docs/live.md, "How it is
mounted"): in a private copy of the mount namespace, mobynit's earlier
overlays are detached (showing the base again, there only), raw images are
loop-mounted read-only on a private tmpfs, the overlays are built from short
bind-mounted names, and a detached copy of each (open_tree) is handed back.
Every staging mount dies with the namespace copy.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import attrs

from mobynit.core import images, syscalls, sysext
from mobynit.core.errors import shown
from mobynit.core.policy import CMDLINE_ABI
from mobynit.core.record import LiveEntry
from mobynit.tools.live_sources import CONTAINER, Candidate, container_candidates, host_arch
from mobynit.tools.live_state import SOURCE, LiveError, Settings, ours_on_top


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
        images.mount_image(fd, target, image.kind or "")
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
    arch = host_arch()
    from mobynit.core.cmdline import Cmdline

    cmdline = Cmdline(s.cmdline)
    disabled = cmdline.extensions_disabled_by()
    abi_token = cmdline.get(CMDLINE_ABI)
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
                has, refusal, outside = sysext.content(top, hierarchies)
                warning = sysext.outside_warning(outside, hierarchies)
                refusal = (refusal or sysext.verdict(image.name, top, host, arch)
                           or images.kernel_refusal(top, s.kernel_release, abi_token))
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
    sysexts = sorted((p for p in kept if p[0].kind != CONTAINER), key=lambda p: sysext.version_key(p[0].name), reverse=True)
    normals = sorted((p for p in kept if p[0].kind == CONTAINER and not p[0].override), key=lambda p: p[0].priority)
    order = overrides + sysexts + normals

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
