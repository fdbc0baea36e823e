"""The mount plan: the exact operations that build the root, as data.

`plan` prints these operations and `assemble` executes the very same
objects, so what a user reads is what the boot does. Building a plan is pure:
it takes the hostapp, the ordered decisions and the limits, and it is where
extensions that do not fit the kernel's limits are dropped.

Two layouts give the same files:

- flat: one read-only overlay of every layer, `<override layers>:<hostapp
  layers>:<normal layers>`. Stacking depth 1, so the booted system can still
  stack an overlay (systemd-sysext, a container engine) on its root. Only
  valid when no image's whiteouts or opaque directories reach an image below
  it; the caller decides that (see facts.py).
- nested (the reference tool's): each image's layers are their own overlay
  under the work directory, the root an overlay of those, the intermediate
  mounts detached afterwards. Always valid; depth 2.

Two mechanisms put the lower layers in: the new mount API (`fsconfig
lowerdir+`, one layer per call, kernels >= 6.8) has no length limit; mount(2)
carries all options in one page, so layers are named by short relative names
(links in a directory of ours for flat, the store's `l/` links for each
image, mount point numbers for the nested root), which fits 500 layers in
a 4 KiB page.

At over 400 lines this module is long on purpose: the operations, the mount
order and the planner share their names and limits, and the planner is only
readable beside the operations it emits.
"""

from __future__ import annotations

import posix

from mobynit.core import syscalls
from mobynit.core.errors import shown
from mobynit.core.fileio import make_dirs
from mobynit.core.model import OVERRIDE, SYSEXT, Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from mobynit.core.model import Container, Decision, Layer

MAX_LOWER = 500  # overlayfs: OVL_MAX_STACK
FSCONFIG_VALUE_MAX = 255  # fsconfig() copies at most 256 bytes, NUL included
EMPTY = "empty"  # a lower dir with nothing in it, for one-layer images
LINKS = "l"  # the flat mount(2) layout's directory of short layer links
HOSTAPP = "hostapp"  # owner tag of the hostapp's operations
ROOT = "root"  # owner tag of the root mount
FLAT = "flat"
NESTED = "nested"
FSCONFIG = "fsconfig"
MOUNT = "mount"


def lowerdir_plus_supported(kernel_release: str) -> bool:
    """overlayfs takes `lowerdir+` through fsconfig() from Linux 6.8 on."""
    head = kernel_release.split("-", 1)[0].split(".")
    try:
        return (int(head[0]), int(head[1]) if len(head) > 1 else 0) >= (6, 8)
    except ValueError:
        return False


class Operation(Record):
    __slots__ = ()
    owner: str

    def describe(self) -> str:
        raise NotImplementedError

    def as_json(self) -> dict[str, object]:
        raise NotImplementedError

    def execute(self) -> None:
        raise NotImplementedError

    def undo(self) -> None:
        """Revert a successful execute(), when a later step fails."""


def _op_json(op: str, *, target: str, owner: str, source: str | None = None, fstype: str | None = None,
             options: str | None = None, flags: Sequence[str] = (), cwd: str | None = None) -> dict[str, object]:
    return {"op": op, "source": source, "target": target, "fstype": fstype, "options": options,
            "flags": list(flags), "cwd": cwd, "owner": owner}


class MakeDir(Operation):
    """Create a mount point (and its parents) under the work directory."""

    __slots__ = ("path", "owner")
    path: str

    def describe(self) -> str:
        return f"mkdir -p {self.path}"

    def as_json(self) -> dict[str, object]:
        return _op_json("mkdir", target=self.path, owner=self.owner)

    def execute(self) -> None:
        make_dirs(self.path, 0o755)


class Mount(Operation):
    """One mount(2) call; `cwd` is where relative lower dirs resolve."""

    __slots__ = ("source", "target", "fstype", "options", "flags", "cwd", "owner")
    source: str
    target: str
    fstype: str
    options: str
    flags: tuple[str, ...]
    cwd: str | None

    def describe(self) -> str:
        where = f"cd {self.cwd} && " if self.cwd else ""
        return f"{where}mount -t {self.fstype} {self.source} {self.target} -o {','.join((*self.flags, self.options))}"

    def as_json(self) -> dict[str, object]:
        return _op_json("mount", source=self.source, target=self.target, fstype=self.fstype, options=self.options,
                        flags=self.flags, cwd=self.cwd, owner=self.owner)

    def execute(self) -> None:
        flags = 0
        for name in self.flags:
            flags |= syscalls.FLAGS[name]
        with _cwd(self.cwd):
            syscalls.mount(self.source, self.target, self.fstype, flags, self.options)

    def undo(self) -> None:
        syscalls.umount(self.target, syscalls.MNT_DETACH)


class FsMount(Operation):
    """An overlay made with the new mount API: one `lowerdir+` per layer, no page limit.

    `layers` are (cwd, path) pairs, top first: each path is resolved from its
    cwd (the store's overlay2 directory), which keeps every value short.
    """

    __slots__ = ("target", "layers", "owner")
    target: str
    layers: tuple[tuple[str | None, str], ...]

    @property
    def options(self) -> str:
        return ",".join(f"lowerdir+={path}" for _, path in self.layers)

    def describe(self) -> str:
        lines = [f"fsopen overlay -> {self.target} (ro, {len(self.layers)} lower layers, top first):"]
        cwd = None
        for where, path in self.layers:
            if where != cwd:
                lines.append(f"    cd {where}" if where else "    cd /")
                cwd = where
            lines.append(f"    fsconfig lowerdir+={path}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        doc = _op_json("fsmount", source="overlay", target=self.target, fstype="overlay", options=self.options,
                       flags=("ro",), owner=self.owner)
        doc["layers"] = [[cwd, path] for cwd, path in self.layers]
        return doc

    def execute(self) -> None:
        fs = syscalls.fsopen("overlay")
        try:
            back = posix.open(".", posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
            try:
                here = None
                for cwd, path in self.layers:
                    if cwd != here:  # layers come grouped by store: one chdir per group
                        posix.chdir(cwd or "/")
                        here = cwd
                    syscalls.fsconfig_string(fs, "lowerdir+", path)
            finally:
                posix.fchdir(back)
                posix.close(back)
            syscalls.fsconfig_create(fs)
            mnt = syscalls.fsmount(fs, syscalls.MOUNT_ATTR_RDONLY)
        finally:
            posix.close(fs)
        try:
            syscalls.move_mount_to(mnt, self.target)
        finally:
            posix.close(mnt)

    def undo(self) -> None:
        syscalls.umount(self.target, syscalls.MNT_DETACH)


class LinkLayers(Operation):
    """Short symlinks to layer directories, so that mount(2)'s one page holds 500 of them."""

    __slots__ = ("directory", "links", "owner")
    directory: str
    links: tuple[tuple[str, str], ...]  # (name, absolute layer directory)

    def describe(self) -> str:
        return "\n".join([f"mkdir -p {self.directory}"] + [f"    ln -s {t} {self.directory}/{n}" for n, t in self.links])

    def as_json(self) -> dict[str, object]:
        doc = _op_json("symlinks", target=self.directory, owner=self.owner)
        doc["links"] = [[name, target] for name, target in self.links]
        return doc

    def execute(self) -> None:
        make_dirs(self.directory, 0o700)
        for name, target in self.links:
            path = f"{self.directory}/{name}"
            try:
                posix.symlink(target, path)
            except FileExistsError:  # a previous attempt's: replace it
                posix.unlink(path)
                posix.symlink(target, path)

    def undo(self) -> None:
        RemoveLinks(directory=self.directory, names=tuple(n for n, _ in self.links), owner=self.owner).execute()


class RemoveLinks(Operation):
    """The layer links are only needed while mount(2) resolves them."""

    __slots__ = ("directory", "names", "owner")
    directory: str
    names: tuple[str, ...]

    def describe(self) -> str:
        return f"rm -r {self.directory} ({len(self.names)} links)"

    def as_json(self) -> dict[str, object]:
        return _op_json("unlink", target=self.directory, owner=self.owner)

    def execute(self) -> None:
        for name in self.names:
            try:
                posix.unlink(f"{self.directory}/{name}")
            except FileNotFoundError:
                pass
        posix.rmdir(self.directory)


class Detach(Operation):
    """Lazily unmount an intermediate layer mount the root no longer needs by path."""

    __slots__ = ("target", "owner")
    target: str

    def describe(self) -> str:
        return f"umount --lazy {self.target}"

    def as_json(self) -> dict[str, object]:
        return _op_json("detach", target=self.target, flags=("detach",), owner=self.owner)

    def execute(self) -> None:
        syscalls.umount(self.target, syscalls.MNT_DETACH)


class RemoveDir(Operation):
    __slots__ = ("path", "owner")
    path: str

    def describe(self) -> str:
        return f"rmdir {self.path}"

    def as_json(self) -> dict[str, object]:
        return _op_json("rmdir", target=self.path, owner=self.owner)

    def execute(self) -> None:
        posix.rmdir(self.path)


class _cwd:
    """Run a mount call from `path` (relative lower dirs resolve there), then come back."""

    __slots__ = ("path", "back")

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.back = -1

    def __enter__(self) -> None:
        if self.path is not None:
            self.back = posix.open(".", posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
            posix.chdir(self.path)

    def __exit__(self, *exc: object) -> None:
        if self.back >= 0:
            posix.fchdir(self.back)
            posix.close(self.back)


class Plan(Record):
    """Everything boot will do, and why: printed by `plan`, executed by `assemble`."""

    __slots__ = ("hostapp", "decisions", "disabled_by", "disabled_reason", "operations", "page_size",
                 "kernel_release", "target", "layout", "layout_reason", "mechanism")
    hostapp: Container
    decisions: tuple[Decision, ...]
    disabled_by: str | None
    disabled_reason: str | None
    operations: tuple[Operation, ...]
    page_size: int
    kernel_release: str
    target: str
    layout: str
    layout_reason: str | None
    mechanism: str

    @property
    def included(self) -> list[Decision]:
        return [d for d in self.decisions if d.included]

    @property
    def stacking_depth(self) -> int:
        return 2 if self.layout == NESTED and self.included else 1

    def as_json(self) -> dict[str, object]:
        """The plan document (docs/plan-json.md): the boot record this plan would leave, less what only a run knows."""
        from mobynit.core.record import BootRecord

        return BootRecord.from_plan(self).as_json(plan_only=True)


def _fits(options_len: int, entries: int, page_size: int | None) -> str | None:
    """Why a mount would fail, or None; page_size None: no length limit (fsconfig)."""
    if page_size is not None and options_len > page_size - 1:
        return f"{options_len} bytes of mount options, more than the {page_size - 1} a {page_size}-byte page holds"
    if entries > MAX_LOWER:
        return f"{entries} lower layers, more than overlayfs's {MAX_LOWER}"
    return None


def short_name(i: int) -> str:
    """0..9, a..z, 10..: the shortest names for the i-th layer link or mount point."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = digits[i % 36]
    i //= 36
    while i:
        out = digits[i % 36] + out
        i //= 36
    return out


def _joined_len(names_count: int, first: int = 0) -> int:
    """Length of ":".join(short_name(i) for i in range(first, first + n))."""
    return sum(len(short_name(i)) + 1 for i in range(first, first + names_count)) - (1 if names_count else 0)


def mount_order(kept: Sequence[Decision], hostapp: Container) -> list[tuple[str, Container]]:
    """(owner, image) top first: overrides, sysext images, the hostapp, normal extensions.

    The one definition of the stacking order; `kept` is already sorted
    within each group (policy.order_key). The owner is HOSTAPP or the
    extension's id.
    """
    return [
        *((d.extension.id, _image(d)) for d in kept if d.position == OVERRIDE),
        *((d.extension.id, _image(d)) for d in kept if d.position == SYSEXT),
        (HOSTAPP, hostapp),
        *((d.extension.id, _image(d)) for d in kept if d.position not in (OVERRIDE, SYSEXT)),
    ]


def _image(d: Decision) -> Container:
    c = d.extension.container
    assert c is not None, "only readable extensions are included"
    return c


def _new_layers(hostapp: Container, kept: Sequence[Decision]) -> list[int]:
    """For each of `kept` (in mount order), how many layers it adds to a flat root
    that holds everything before it in the drop order: overrides, then normals.

    Dropping from the end removes exactly these counts, because a layer shared
    with an earlier-kept image stays listed (once) as long as that image stays.
    """
    seen = {layer.path for layer in hostapp.layers}
    counts = []
    for d in kept:
        c = _image(d)
        n = 0
        for layer in c.layers:
            if layer.path not in seen:
                seen.add(layer.path)
                n += 1
        counts.append(n)
    return counts


def _flat_layers(order: Sequence[tuple[str, Container]]) -> list[tuple[str, Layer]]:
    """Every layer top first, each once: images built on the same base share layer
    directories, which one overlay must not list twice (ELOOP). The lower copy
    of a shared layer is shadowed by its identical upper copy, so dropping it
    changes no file."""
    seen: set[str] = set()
    out = []
    for _, c in order:
        for layer in c.layers:
            if layer.path not in seen:
                seen.add(layer.path)
                out.append((c.overlay2, layer))
    return out


def _stack_mount(container: Container, target: str, empty: str, owner: str) -> Mount:
    """Mount one image's layers by the store's short `l/` links, as Docker does.

    An overlay without an upper dir needs two lower dirs, so a one-layer image
    gets an empty one below it (which also keeps its whiteouts inert).
    """
    dirs = [layer.link for layer in container.layers]
    if len(dirs) == 1:
        dirs.append(empty)
    return Mount(source="overlay", target=target, fstype="overlay", options="lowerdir=" + ":".join(dirs),
                 flags=("ro",), cwd=container.overlay2, owner=owner)


def build(
    hostapp: Container,
    decisions: Sequence[Decision],
    *,
    target: str,
    workdir: str,
    page_size: int,
    kernel_release: str = "",
    disabled_by: str | None = None,
    disabled_reason: str | None = None,
    layout: str = NESTED,
    layout_reason: str | None = None,
    mechanism: str = MOUNT,
) -> Plan:
    """The operations for this hostapp and these (ordered) decisions.

    Raises ValueError if the hostapp alone cannot be mounted within the limits.
    Extensions that cannot are dropped, each with its reason: in the nested
    layout first any whose own layers overflow a mount; then, while the root
    does not fit, normal extensions from the last, then overrides from the
    lowest priority. The same input always gives the same plan.
    """
    workdir = workdir.rstrip("/") or "/"
    if not workdir.startswith("/") or any(c in workdir for c in ":,\\\n") or len(workdir) > 200:
        raise ValueError(f"work directory {workdir!r} must be absolute, at most 200 bytes, and free of ':', ',', '\\' and newlines")
    if layout not in (FLAT, NESTED) or mechanism not in (FSCONFIG, MOUNT):
        raise ValueError(f"unknown layout {layout!r} or mechanism {mechanism!r}")
    empty = f"{workdir}/{EMPTY}"
    limit = None if (layout == FLAT and mechanism == FSCONFIG) else page_size

    host_alone = _stack_mount(hostapp, target, empty, HOSTAPP)
    problem = _fits(len(host_alone.options), len(host_alone.options.split(":")), page_size)
    if problem:
        raise ValueError(f"hostapp {shown(hostapp.name)} ({hostapp.id[:12]}) cannot be mounted: {problem}")

    final: list[Decision] = []
    kept: list[Decision] = []
    for d in decisions:
        if d.included and layout == NESTED:
            own = _stack_mount(_image(d), "", empty, d.extension.id)
            problem = _fits(len(own.options), len(own.options.split(":")), page_size)
            if problem:
                d = d.drop(f"does not fit in one mount: {problem}")
        if d.included:
            kept.append(d)
        final.append(d)

    def root_problem(entries: int) -> str | None:
        if layout == NESTED:  # one mount point per image, named relative to the work directory
            return _fits(len("lowerdir=") + _joined_len(entries - 1) + 1 + len(HOSTAPP), entries, limit)
        return _fits(len("lowerdir=") + _joined_len(entries), entries, limit)

    # The root's lower entries as extensions are dropped from the end of the
    # mount order: counted once, then each drop takes its own entries away.
    if layout == NESTED:
        entries = len(kept) + 1
        own = [1] * len(kept)
    else:
        own = _new_layers(hostapp, kept)
        entries = len(hostapp.layers) + sum(own)
    dropped: dict[str, str] = {}
    while kept and (problem := root_problem(entries)):
        d = kept.pop()
        entries -= own.pop()
        dropped[d.extension.id] = f"dropped to fit the root mount: with it, {problem}"
    final = [d.drop(dropped[d.extension.id]) if d.extension.id in dropped else d for d in final]
    order = mount_order(kept, hostapp)

    ops: list[Operation] = []
    if not kept:
        if len(hostapp.layers) == 1:
            ops.append(MakeDir(path=empty, owner=HOSTAPP))
        ops.append(host_alone)
    elif layout == NESTED:
        if any(len(c.layers) == 1 for _, c in order):
            ops.append(MakeDir(path=empty, owner=HOSTAPP))
        names = []
        stacked: list[Mount] = []
        for owner, c in order:
            name = HOSTAPP if owner == HOSTAPP else short_name(len(names) - (HOSTAPP in names))
            names.append(name)
            stacked.append(_stack_mount(c, f"{workdir}/{name}", empty, owner))
        for m in stacked:
            ops += (MakeDir(path=m.target, owner=m.owner), m)
        ops.append(Mount(source="overlay", target=target, fstype="overlay", options="lowerdir=" + ":".join(names),
                         flags=("ro",), cwd=workdir, owner=ROOT))
        for m in stacked:
            ops += (Detach(target=m.target, owner=ROOT), RemoveDir(path=m.target, owner=ROOT))
    else:
        layers = _flat_layers(order)
        if mechanism == FSCONFIG:
            ops.append(FsMount(target=target, layers=tuple((cwd, layer.link) for cwd, layer in layers), owner=ROOT))
        else:
            links = f"{workdir}/{LINKS}"
            named = tuple((short_name(i), layer.path) for i, (_, layer) in enumerate(layers))
            ops.append(LinkLayers(directory=links, links=named, owner=ROOT))
            ops.append(Mount(source="overlay", target=target, fstype="overlay",
                             options="lowerdir=" + ":".join(n for n, _ in named), flags=("ro",), cwd=links, owner=ROOT))
            ops.append(RemoveLinks(directory=links, names=tuple(n for n, _ in named), owner=ROOT))
    return Plan(
        hostapp=hostapp,
        decisions=tuple(final),
        disabled_by=disabled_by,
        disabled_reason=disabled_reason,
        operations=tuple(ops),
        page_size=page_size,
        kernel_release=kernel_release,
        target=target,
        layout=layout if kept else FLAT,
        layout_reason=layout_reason if kept else None,
        mechanism=mechanism if (kept and layout == FLAT) else MOUNT,
    )
