"""From two stores to one mounted root: the sequence shared by the CLI and boot.

read the hostapp -> find extensions -> select -> plan -> execute -> record.
A fault in an extension never escapes this module: it becomes a decision
with a reason, and if the kernel still refuses a mount the plan is rebuilt
without the culprit. Only the hostapp can make it fail (HostappError).
"""

from __future__ import annotations

import posix
import stat
import time

from mobynit.core import labels as label
from mobynit.core import plan as planner
from mobynit.core import policy, render
from mobynit.core.cmdline import Cmdline
from mobynit.core.errors import HostappError, MountError, StoreError, shown
from mobynit.core.fileio import is_dir, lexists
from mobynit.core.model import Record
from mobynit.core.mounttable import is_mount_point
from mobynit.core.paths import DEFAULT_WORKDIR, StorePaths, dirname
from mobynit.core.record import BootRecord, Counted
from mobynit.core.store import Store, hostapp_id
from mobynit.core.workdir import WorkDir

IMAGE_MOUNTS = "images"  # below the work directory: raw sysext images, mounted while read

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from mobynit.core.attempts import Attempts, Location
    from mobynit.core.images import Mounts
    from mobynit.core.model import Container, Decision, Extension
    from mobynit.core.plan import Operation, Plan


def read_hostapp(where: StorePaths) -> Container:
    try:
        return Store(where.hostapp_store).container(hostapp_id(where.sysroot))
    except StoreError as e:
        raise HostappError(f"cannot read the hostapp: {e}") from None


def find_extensions(
    where: StorePaths, cmdline: Cmdline, kernel_release: str, data_reason: str | None = None,
    images: Mounts | None = None,
) -> tuple[list[Extension], str | None, str | None]:
    """(extensions, disabled_by, disabled_reason): the data store's extension
    containers, then, given where to mount them (`images`, from image_mounts),
    the data partition's sysext images (mobynit.core.images); nothing is read
    when extensions are off.

    `data_reason` says why there is no data partition, when the caller knows
    (boot): it becomes the one line about it.
    """
    token = cmdline.extensions_disabled_by()
    if token is not None:
        return [], token, f"extensions disabled by {shown(token)} on the kernel command line"
    if where.data is None or where.data_store is None:
        return [], None, f"{shown(data_reason, 1000) if data_reason else 'no data partition given'}: hostapp only"
    if not is_dir(where.data):
        return [], None, f"data partition not found at {where.data}: hostapp only"
    problem = _marker_problem(where.purge_marker) if where.purge_marker else None
    if problem is not None:
        if problem == "is missing" and is_dir(f"{where.data}/containers") and not lexists(where.data_store):
            # A common slip: the engine's data-root given where the partition holding it belongs.
            return [], None, (f"{where.data} is an engine's data-root (it has containers/), not a data partition:"
                              f" give the partition that holds it, or the store with --data-store: hostapp only")
        return [], None, f"{where.purge_marker} {problem} (a data reset may be pending): extensions not overlaid"
    try:
        found = Store(where.data_store).scan(label.is_extension, kernel_release)
    except StoreError as e:  # a `docker` that is a file, a directory the file system cannot read
        return [], None, f"extension store unreadable ({e}): hostapp only"
    if images is not None and where.images is not None:  # image_mounts found the directory
        from mobynit.core.images import find as find_images

        found += find_images(where.images, posix.stat(where.data).st_dev, images, kernel_release)
    return found, None, None


def image_mounts(where: StorePaths, workdir: str, prepare: Callable[[str], None] | None = None) -> Mounts | None:
    """Where this run mounts the data partition's raw images to read them
    (`<workdir>/images`), or None when the partition has no image directory."""
    if where.images is None or not lexists(where.images):
        return None
    from mobynit.core.images import Mounts

    return Mounts(f"{workdir.rstrip('/')}/{IMAGE_MOUNTS}", prepare)


def _marker_problem(path: str) -> str | None:
    """Why the purge marker does not count as present, or None when it does.

    The data partition is wiped at the next boot when its marker is gone; only
    a regular file vouches that it is not. A symlink (dangling or not) or
    anything else in its place counts as missing: extensions stay off rather
    than being overlaid from a partition about to be reset (docs/decisions.md).
    """
    try:
        st = posix.lstat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be checked ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink, not the marker file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


class Selection(Record):
    """What was read and decided, before any mount: the input of every plan attempt."""

    __slots__ = ("hostapp", "decisions", "disabled_by", "disabled_reason", "kernel_release")
    hostapp: Container
    decisions: tuple[Decision, ...]
    disabled_by: str | None
    disabled_reason: str | None
    kernel_release: str


def select(
    where: StorePaths, cmdline: Cmdline, kernel_release: str, *, extensions: bool = True,
    timings: dict[str, float] | None = None, data_reason: str | None = None, images: Mounts | None = None,
) -> Selection:
    """Read and decide. The data partition's sysext images are read only given
    `images`, where raw ones are mounted to be read (`mobynit index` and `mount`
    leave them alone)."""
    t0 = time.perf_counter()
    hostapp = read_hostapp(where)
    if extensions:
        found, token, why = find_extensions(where, cmdline, kernel_release, data_reason, images)
    else:
        found, token, why = [], None, "hostapp only"
    host = None
    if found:
        from mobynit.core.compat import host_architecture
        from mobynit.core.layers import read_os_release

        try:
            os_release = read_os_release([layer.path for layer in hostapp.layers])
        except StoreError:
            os_release = {}  # unreadable: the gates then refuse what names an OS, accept the rest
        host = policy.Host(
            os_release=os_release,
            architecture=host_architecture(),
            strict_os_version=cmdline.flag(policy.CMDLINE_STRICT_OS_VERSION),
        )
    t1 = time.perf_counter()
    decisions = policy.select(found, kernel_release, cmdline.get(policy.CMDLINE_ABI), host)
    if timings is not None:
        timings["read"] = _ms(t1 - t0)
        timings["select"] = _ms(time.perf_counter() - t1)
    return Selection(
        hostapp=hostapp, decisions=tuple(decisions), disabled_by=token, disabled_reason=why, kernel_release=kernel_release
    )


def make_plan(
    sel: Selection,
    *,
    target: str,
    workdir: str,
    page_size: int,
    exclude: Mapping[str, str] | None = None,
    mechanism: str | None = None,
    layout: str | None = None,
) -> Plan:
    """The plan boot would run: flat when the layers' recorded facts prove it
    means the same as nested, nested otherwise."""
    decisions: Sequence[Decision] = sel.decisions
    if exclude:
        decisions = [d.drop(exclude[d.extension.id]) if d.included and d.extension.id in exclude else d for d in decisions]
    if mechanism is None:
        mechanism = planner.FSCONFIG if planner.lowerdir_plus_supported(sel.kernel_release) else planner.MOUNT

    def build(layout: str, why: str | None) -> Plan:
        try:
            return planner.build(
                sel.hostapp, decisions, target=target, workdir=workdir, page_size=page_size,
                kernel_release=sel.kernel_release, disabled_by=sel.disabled_by, disabled_reason=sel.disabled_reason,
                layout=layout, layout_reason=why, mechanism=mechanism,
            )
        except ValueError as e:
            raise HostappError(str(e)) from None

    if layout is not None:
        return build(layout, "asked for")
    flat = build(planner.FLAT, None)
    if not flat.included:
        return flat
    conflict = flat_conflict(flat)
    if conflict is not None:
        return build(planner.NESTED, conflict)
    lost = sum(d.included for d in decisions) - len(flat.included)
    if lost:
        # Flat counts every layer against overlayfs's 500, nested one per image:
        # keeping extensions matters more than stacking depth.
        nested = build(planner.NESTED, None)
        if len(nested.included) > len(flat.included):
            n = len(nested.included) - len(flat.included)
            return nested.replace(layout_reason=f"a flat root would drop {n} more extension{'s' if n > 1 else ''} to stay within overlayfs's 500 layers")
    return flat


def flat_conflict(plan: Plan) -> str | None:
    """Why this flat plan would not mean what the nested layout means, or None."""
    from mobynit.core import facts

    stacks = [
        facts.Stack(name=c.name, dirs=tuple([layer.path for layer in c.layers]),
                    facts=tuple([layer.facts for layer in c.layers]), hostapp=owner == planner.HOSTAPP)
        for owner, c in planner.mount_order(plan.included, plan.hostapp)
    ]
    return facts.flat_conflict(stacks)


class OperationFailed(MountError):
    def __init__(self, op: Operation, error: OSError) -> None:
        super().__init__(f"{op.describe()}: {error.strerror}")
        self.op = op


def execute(operations: Sequence[Operation]) -> None:
    """Run the operations in order; on failure undo what was done, then raise."""
    done: list[Operation] = []
    for op in operations:
        try:
            op.execute()
        except OSError as e:
            for earlier in reversed(done):
                try:
                    earlier.undo()
                except OSError:
                    pass
            raise OperationFailed(op, e) from None
        done.append(op)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def mount_plan(
    sel: Selection,
    *,
    target: str,
    workdir: str,
    page_size: int,
    log: Callable[[str], None],
    layout: str | None = None,
    timings: dict[str, float] | None = None,
    exclude: Mapping[str, str] | None = None,
    first: Plan | None = None,
) -> tuple[Plan, list[str]]:
    """Execute a plan; when the kernel refuses an extension, rebuild without it.

    `exclude` maps extension ids to the reason they are kept out from the start;
    `first` is a plan already made for exactly these inputs, tried before any other.
    Returns the plan that was carried out and the fallbacks taken on the way.
    Holds the work directory (mobynit.core.workdir) throughout.
    """
    with WorkDir(workdir):
        return _mount_plan(sel, target=target, workdir=workdir, page_size=page_size, log=log, layout=layout,
                           timings=timings, exclude=exclude, first=first)


def _mount_plan(
    sel: Selection,
    *,
    target: str,
    workdir: str,
    page_size: int,
    log: Callable[[str], None],
    layout: str | None,
    timings: dict[str, float] | None,
    exclude: Mapping[str, str] | None,
    first: Plan | None,
) -> tuple[Plan, list[str]]:
    if is_mount_point(target):
        raise MountError(f"{target} is already a mount point: unmount it first (a root is never mounted on a root)")
    exclude = dict(exclude or {})
    fallbacks: list[str] = []
    mechanism: str | None = None
    spent = {"plan": 0.0, "mount": 0.0}
    while True:
        t0 = time.perf_counter()
        if first is not None:
            plan, first = first, None
        else:
            plan = make_plan(
                sel, target=target, workdir=workdir, page_size=page_size, exclude=exclude, mechanism=mechanism,
                layout=layout,
            )
        t1 = time.perf_counter()
        spent["plan"] += t1 - t0
        try:
            execute(plan.operations)
            spent["mount"] += time.perf_counter() - t1
        except OperationFailed as e:
            spent["mount"] += time.perf_counter() - t1
            if isinstance(e.op, planner.FsMount):
                reason = f"the new mount API refused the root ({e}); using mount(2)"
                mechanism = planner.MOUNT
                fallbacks.append(reason)
                log(f"fallback: {reason}")
                continue
            owner = e.op.owner
            included = [d.extension.id for d in plan.decisions if d.included]
            if owner == planner.HOSTAPP or not included:
                raise HostappError(f"cannot mount the hostapp: {e}") from None
            if owner == planner.ROOT:
                reason = f"the root mount failed with extensions ({e}); mounting the hostapp alone"
                exclude.update({i: reason for i in included})
            else:
                reason = f"mounting it failed: {e}"
                exclude[owner] = reason
            fallbacks.append(reason)
            log(f"fallback: {reason}")
            continue
        break
    if timings is not None:
        timings.update({k: _ms(v) for k, v in spent.items()})
    if not posix.statvfs(target).f_flag & posix.ST_RDONLY:
        raise HostappError(f"{target} was mounted but is not read-only; refusing to hand it over")
    return plan, fallbacks


def assemble(
    where: StorePaths,
    *,
    target: str,
    cmdline: Cmdline,
    kernel_release: str,
    page_size: int,
    workdir: str = DEFAULT_WORKDIR,
    log: Callable[[str], None] = lambda line: None,
    layout: str | None = None,
    attempts_file: str | None = None,
    data_reason: str | None = None,
    prepare_images: Callable[[str], None] | None = None,
) -> BootRecord:
    """Mount the read-only root at `target`; return the record of what was done.

    With `attempts_file`, boots with extensions are counted there, and after
    `mobynit.max_tries` unconfirmed ones the hostapp is mounted alone (see attempts.py).
    `data_reason`: why `data` is None, said once instead of a generic line.
    `prepare_images(kind)` runs before a raw image is mounted (boot loads modules).
    The work directory is held throughout: raw images are mounted below it
    while they are read, and detached at the end (the root holds its own).
    """
    with WorkDir(workdir):
        mounts = image_mounts(where, workdir, prepare_images)
        try:
            return _assemble(where, target=target, cmdline=cmdline, kernel_release=kernel_release,
                             page_size=page_size, workdir=workdir, log=log, layout=layout,
                             attempts_file=attempts_file, data_reason=data_reason, mounts=mounts)
        finally:
            if mounts is not None:
                mounts.close()


def _assemble(
    where: StorePaths, *, target: str, cmdline: Cmdline, kernel_release: str, page_size: int, workdir: str,
    log: Callable[[str], None], layout: str | None, attempts_file: str | None, data_reason: str | None,
    mounts: Mounts | None,
) -> BootRecord:
    timings: dict[str, float] = {}
    sel = select(where, cmdline, kernel_release, timings=timings, data_reason=data_reason, images=mounts)
    exclude: dict[str, str] = {}
    first = None
    counting = None
    dry_seconds = 0.0
    if attempts_file is not None:
        from mobynit.core import attempts

        tries = attempts.max_tries(cmdline.get(attempts.CMDLINE_MAX_TRIES), log)
        previous = attempts.read(attempts_file)
        t0 = time.perf_counter()
        first = make_plan(sel, target=target, workdir=workdir, page_size=page_size, layout=layout)
        dry_seconds = time.perf_counter() - t0
        planned = [d.extension.id for d in first.included]
        now, giving_up = attempts.at_boot(previous, planned, tries)
        if giving_up is not None:
            log(giving_up)
            exclude = dict.fromkeys(planned, giving_up)
            first = None  # that plan had the extensions in: make the hostapp-only one
        counting = (previous, planned, now, giving_up, tries)
    plan, fallbacks = _mount_plan(
        sel, target=target, workdir=workdir, page_size=page_size, log=log, layout=layout, timings=timings,
        exclude=exclude, first=first,
    )
    timings["plan"] = round(timings["plan"] + dry_seconds * 1000, 3)  # the first plan was made above
    counted = None
    if attempts_file is not None and counting is not None:
        counted = _count_attempt(attempts_file, plan, *counting, log)
    record = BootRecord.from_plan(plan, fallbacks=tuple(fallbacks), timings_ms=timings, attempts=counted)
    for line in render.selection(record):
        log(line)
    log(render.mounted(record))
    return record


def _count_attempt(where: Location, plan: Plan, previous: Attempts, planned: Sequence[str], now: Attempts,
                   giving_up: str | None, tries: int, log: Callable[[str], None]) -> Counted:
    """Record this boot in the attempts file; a failure to write is a warning, never a failed boot."""
    from mobynit.core import attempts

    mounted = sorted(d.extension.id for d in plan.included)
    if giving_up is None and mounted != sorted(planned):
        # A fallback kept some planned extensions out: what booted is another set, counted as such.
        now, _ = attempts.at_boot(previous, mounted, tries)
    if now != previous:
        try:
            for planted in attempts.write(where, now):
                log(f"warning: {planted} was not a directory (a symlink or a file): replaced")
        except StoreError as e:
            log(f"warning: cannot record this boot attempt: {e}")
    return Counted(file=where.path, extensions=now.extensions, unconfirmed=now.unconfirmed, max_tries=tries,
                   fallback=now.fallback, reason=giving_up)


def index_stores(where: StorePaths, kernel_release: str, force: bool = False) -> tuple[int, int]:
    """Record the facts of every layer of the hostapp and of each readable
    extension (`mobynit index`); returns (layers walked, layers in all)."""
    from mobynit.core import facts

    sel = select(where, Cmdline(""), kernel_release)
    containers = [sel.hostapp] + [d.extension.container for d in sel.decisions if d.extension.container]
    layers = {layer.id: dirname(layer.path) for c in containers for layer in c.layers}
    try:
        written = facts.index(sorted(layers.items()), force=force)
    except OSError as e:
        raise StoreError(f"cannot record layer facts: {e.filename}: {e.strerror}") from None
    return len(written), len(layers)
