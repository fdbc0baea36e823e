"""The mount plan: the exact operations that build the root, as data.

`plan` prints these operations and `assemble` executes the very same
objects, so what a user reads is what the boot does. Building a plan is pure:
it takes the hostapp, the ordered decisions and the limits, and it is where
extensions that do not fit the kernel's limits are dropped.

The layout mirrors the reference tool (nested): each container's layers are
mounted as their own read-only overlay under the work directory, so that
whiteouts act only inside the image that carries them; the root is an
overlay of those, `lowerdir=<overrides>:<hostapp>:<normal extensions>`; the
intermediate mounts are then detached (the root keeps its own references
to them) so the booted system does not see them.
"""

from __future__ import annotations

from mobynit.model import OVERRIDE, Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from mobynit.model import Container, Decision

MAX_LOWER = 500  # overlayfs: OVL_MAX_STACK
EMPTY = "empty"  # a lower dir with nothing in it, for one-layer images
HOSTAPP = "hostapp"  # owner tag of the hostapp's operations
ROOT = "root"  # owner tag of the root mount


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


class MakeDir(Operation):
    """Create a mount point (and its parents) under the work directory."""

    __slots__ = ("path", "owner")
    path: str

    def describe(self) -> str:
        return f"mkdir -p {self.path}"

    def as_json(self) -> dict[str, object]:
        return {"op": "mkdir", "source": None, "target": self.path, "fstype": None, "options": None, "flags": [], "cwd": None, "owner": self.owner}

    def execute(self) -> None:
        import os

        os.makedirs(self.path, mode=0o755, exist_ok=True)


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
        opts = ",".join((*self.flags, self.options)) if self.options else ",".join(self.flags)
        return f"{where}mount -t {self.fstype} {self.source} {self.target} -o {opts}"

    def as_json(self) -> dict[str, object]:
        return {
            "op": "mount",
            "source": self.source,
            "target": self.target,
            "fstype": self.fstype,
            "options": self.options,
            "flags": list(self.flags),
            "cwd": self.cwd,
            "owner": self.owner,
        }

    def execute(self) -> None:
        import os

        from mobynit import syscalls

        flags = 0
        for name in self.flags:
            flags |= _FLAG_BITS[name]
        if self.cwd is None:
            syscalls.mount(self.source, self.target, self.fstype, flags, self.options)
            return
        back = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chdir(self.cwd)
            syscalls.mount(self.source, self.target, self.fstype, flags, self.options)
        finally:
            os.fchdir(back)
            os.close(back)

    def undo(self) -> None:
        from mobynit import syscalls

        syscalls.umount(self.target, syscalls.MNT_DETACH)


class Detach(Operation):
    """Lazily unmount an intermediate layer mount the root no longer needs by path."""

    __slots__ = ("target", "owner")
    target: str

    def describe(self) -> str:
        return f"umount --lazy {self.target}"

    def as_json(self) -> dict[str, object]:
        return {"op": "detach", "source": None, "target": self.target, "fstype": None, "options": None, "flags": ["detach"], "cwd": None, "owner": self.owner}

    def execute(self) -> None:
        from mobynit import syscalls

        syscalls.umount(self.target, syscalls.MNT_DETACH)


class RemoveDir(Operation):
    __slots__ = ("path", "owner")
    path: str

    def describe(self) -> str:
        return f"rmdir {self.path}"

    def as_json(self) -> dict[str, object]:
        return {"op": "rmdir", "source": None, "target": self.path, "fstype": None, "options": None, "flags": [], "cwd": None, "owner": self.owner}

    def execute(self) -> None:
        import os

        os.rmdir(self.path)


_FLAG_BITS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4}


class Plan(Record):
    """Everything boot will do, and why: printed by `plan`, executed by `assemble`."""

    __slots__ = ("hostapp", "decisions", "disabled_by", "disabled_reason", "operations", "page_size", "kernel_release", "target")
    hostapp: Container
    decisions: tuple[Decision, ...]
    disabled_by: str | None
    disabled_reason: str | None
    operations: tuple[Operation, ...]
    page_size: int
    kernel_release: str
    target: str

    @property
    def included(self) -> list[Decision]:
        return [d for d in self.decisions if d.included]

    def as_json(self) -> dict[str, object]:
        h = self.hostapp
        return {
            "version": 1,
            "hostapp": {"id": h.id, "name": h.name, "layers": [layer.path for layer in h.layers]},
            "extensions": [_decision_json(d) for d in self.decisions],
            "disabled_by": self.disabled_by,
            "disabled_reason": self.disabled_reason,
            "kernel_release": self.kernel_release,
            "page_size": self.page_size,
            "target": self.target,
            "mounts": [op.as_json() for op in self.operations],
        }


def _decision_json(d: Decision) -> dict[str, object]:
    ext = d.extension
    doc: dict[str, object] = {
        "id": ext.id,
        "name": ext.name,
        "included": d.included,
        "position": d.position,
        "priority": d.priority,
        "layers": len(ext.container.layers) if ext.container else 0,
    }
    if d.reason is not None:
        doc["reason"] = d.reason
    if d.warning is not None:
        doc["warning"] = d.warning
    return doc


def lowerdir(container: Container, empty: str) -> tuple[str, str | None]:
    """(options, cwd) mounting one container's layers read-only.

    Layers are named by the store's short `l/` links, relative to its
    overlay2 directory as Docker does, which keeps the options short; an
    overlay without an upper dir needs two lower dirs, so a one-layer image
    gets an empty one below it (which also keeps its whiteouts inert).
    """
    dirs = [layer.link for layer in container.layers]
    if len(dirs) == 1:
        dirs.append(empty)
    return "lowerdir=" + ":".join(dirs), container.overlay2


def _stack_mount(container: Container, target: str, empty: str, owner: str) -> Mount:
    options, cwd = lowerdir(container, empty)
    return Mount(source="overlay", target=target, fstype="overlay", options=options, flags=("ro",), cwd=cwd, owner=owner)


def _fits(options: str, entries: int, page_size: int) -> str | None:
    """Why a mount with these options would fail, or None."""
    if len(options) > page_size - 1:
        return f"{len(options)} bytes of mount options, more than the {page_size - 1} a {page_size}-byte page holds"
    if entries > MAX_LOWER:
        return f"{entries} lower layers, more than overlayfs's {MAX_LOWER}"
    return None


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
) -> Plan:
    """The operations for this hostapp and these (ordered) decisions.

    Raises ValueError if the hostapp alone cannot be mounted within the limits.
    Extensions that cannot are dropped, each with its reason: first any whose
    own layers overflow a mount, then, while the root's lower list does not
    fit, normal extensions from the last, then overrides from the lowest priority.
    """
    workdir = workdir.rstrip("/") or "/"
    if not workdir.startswith("/") or any(c in workdir for c in ":,\\\n"):
        raise ValueError(f"work directory {workdir!r} must be absolute and free of ':', ',', '\\' and newlines")
    empty = f"{workdir}/{EMPTY}"
    host_mount = _stack_mount(hostapp, target, empty, HOSTAPP)
    problem = _fits(host_mount.options, len(hostapp.layers) + 1, page_size)
    if problem:
        raise ValueError(f"hostapp {hostapp.name} ({hostapp.id[:12]}) cannot be mounted: {problem}")

    final: list[Decision] = []
    stacks: list[tuple[Decision, Mount]] = []
    for d in decisions:
        if d.included:
            assert d.extension.container is not None
            mnt = _stack_mount(d.extension.container, f"{workdir}/{len(stacks)}", empty, d.extension.id)
            problem = _fits(mnt.options, len(d.extension.container.layers) + 1, page_size)
            if problem:
                d = d.drop(f"does not fit in one mount: {problem}")
            else:
                stacks.append((d, mnt))
        final.append(d)

    # Fit the root's lower list: the kept extensions are a prefix of the mount order.
    host_stack = host_mount.replace(target=f"{workdir}/{HOSTAPP}")
    dropped: dict[str, str] = {}
    while stacks:
        problem = _fits(_root_options(stacks, host_stack), len(stacks) + 1, page_size)
        if problem is None:
            break
        d, _ = stacks.pop()
        dropped[d.extension.id] = f"dropped to fit the root mount: with it, {problem}"
    final = [d.drop(dropped[d.extension.id]) if d.extension.id in dropped else d for d in final]

    ops: list[Operation] = []
    if len(hostapp.layers) == 1 or any(len(_layers_of(d)) == 1 for d, _ in stacks):
        ops.append(MakeDir(path=empty, owner=HOSTAPP))
    if not stacks:
        ops.append(host_mount)
    else:
        ordered = _root_order(stacks, host_stack)
        for m in ordered:
            ops += (MakeDir(path=m.target, owner=m.owner), m)
        root = Mount(
            source="overlay", target=target, fstype="overlay", options=_root_options(stacks, host_stack),
            flags=("ro",), cwd=None, owner=ROOT,
        )
        ops.append(root)
        for m in ordered:
            ops += (Detach(target=m.target, owner=ROOT), RemoveDir(path=m.target, owner=ROOT))
    return Plan(
        hostapp=hostapp,
        decisions=tuple(final),
        disabled_by=disabled_by,
        disabled_reason=disabled_reason,
        operations=tuple(ops),
        page_size=page_size,
        kernel_release=kernel_release,
        target=target,
    )


def _layers_of(d: Decision) -> tuple[object, ...]:
    return d.extension.container.layers if d.extension.container else ()


def _root_order(stacks: Sequence[tuple[Decision, Mount]], host_stack: Mount) -> list[Mount]:
    """Overrides, the hostapp, normal extensions: `stacks` is already in mount order."""
    return [
        *(m for d, m in stacks if d.position == OVERRIDE),
        host_stack,
        *(m for d, m in stacks if d.position != OVERRIDE),
    ]


def _root_options(stacks: Sequence[tuple[Decision, Mount]], host_stack: Mount) -> str:
    return "lowerdir=" + ":".join(m.target for m in _root_order(stacks, host_stack))
