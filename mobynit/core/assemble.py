"""From two stores to one mounted root: the sequence shared by the CLI and boot.

read the hostapp -> find extensions -> select -> plan -> execute -> record.
A fault in an extension never escapes this module: it becomes a decision
with a reason, and if the kernel still refuses a mount the plan is rebuilt
without the culprit. Only the hostapp can make it fail (HostappError).
"""

from __future__ import annotations

import os
import time

from mobynit import DEFAULT_RECORD, DEFAULT_TARGET, DEFAULT_WORKDIR  # noqa: F401 (re-exported for boot)
from mobynit.core import plan as planner
from mobynit.core import labels as label
from mobynit.core import policy
from mobynit.core.cmdline import Cmdline
from mobynit.core.errors import HostappError, MountError, StoreError, shown
from mobynit.core.model import OVERRIDE, Record
from mobynit.core.store import Store, hostapp_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from mobynit.core.attempts import Attempts
    from mobynit.core.model import Container, Decision, Extension
    from mobynit.core.plan import Operation, Plan

HOSTAPP_STORE = "balena"
DATA_STORE = "docker"
PURGE_MARKER = "remove_me_to_reset"


class Layout(Record):
    """Where the stores are: balenaOS defaults, each overridable."""

    __slots__ = ("sysroot", "hostapp_store", "data", "data_store", "purge_marker")
    sysroot: str
    hostapp_store: str
    data: str | None
    data_store: str | None
    purge_marker: str | None


def locate(
    sysroot: str,
    data: str | None = None,
    *,
    hostapp_store: str | None = None,
    data_store: str | None = None,
    purge_marker: str | None = None,
) -> Layout:
    sysroot = sysroot.rstrip("/") or "/"
    if data is not None:
        data = data.rstrip("/") or "/"
    return Layout(
        sysroot=sysroot,
        hostapp_store=hostapp_store or f"{sysroot}/{HOSTAPP_STORE}",
        data=data,
        data_store=data_store or (f"{data}/{DATA_STORE}" if data else None),
        purge_marker=purge_marker or (f"{data}/{PURGE_MARKER}" if data else None),
    )


def read_hostapp(where: Layout) -> Container:
    try:
        return Store(where.hostapp_store).container(hostapp_id(where.sysroot))
    except StoreError as e:
        raise HostappError(f"cannot read the hostapp: {e}") from None


def find_extensions(
    where: Layout, cmdline: Cmdline, kernel_release: str, data_reason: str | None = None
) -> tuple[list[Extension], str | None, str | None]:
    """(extensions, disabled_by, disabled_reason): the store is not read at all when extensions are off.

    `data_reason` says why there is no data partition, when the caller knows
    (boot): it becomes the one line about it.
    """
    token = cmdline.extensions_disabled_by()
    if token is not None:
        return [], token, f"extensions disabled by {shown(token)} on the kernel command line"
    if where.data is None or where.data_store is None:
        return [], None, f"{shown(data_reason, 1000) if data_reason else 'no data partition given'}: hostapp only"
    if not os.path.isdir(where.data):
        return [], None, f"data partition not found at {where.data}: hostapp only"
    if where.purge_marker and not os.path.lexists(where.purge_marker):
        return [], None, f"{where.purge_marker} is missing (a data reset is pending): extensions not overlaid"
    try:
        return Store(where.data_store).scan(label.is_extension, kernel_release), None, None
    except StoreError as e:  # a `docker` that is a file, a directory the file system cannot read
        return [], None, f"extension store unreadable ({e}): hostapp only"


class Selection(Record):
    """What was read and decided, before any mount: the input of every plan attempt."""

    __slots__ = ("hostapp", "decisions", "disabled_by", "disabled_reason", "kernel_release")
    hostapp: Container
    decisions: tuple[Decision, ...]
    disabled_by: str | None
    disabled_reason: str | None
    kernel_release: str


def select(
    where: Layout, cmdline: Cmdline, kernel_release: str, *, extensions: bool = True, timings: dict[str, float] | None = None,
    data_reason: str | None = None,
) -> Selection:
    t0 = time.perf_counter()
    hostapp = read_hostapp(where)
    if extensions:
        found, token, why = find_extensions(where, cmdline, kernel_release, data_reason)
    else:
        found, token, why = [], None, "hostapp only"
    host = None
    if found:
        from mobynit.core.compat import host_architecture
        from mobynit.core.store import read_os_release

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

    stacks = []
    for d in (*[d for d in plan.included if d.position == OVERRIDE], None, *[d for d in plan.included if d.position != OVERRIDE]):
        c = plan.hostapp if d is None else d.extension.container
        assert c is not None
        layer_facts = tuple(layer.facts for layer in c.layers)  # read with the store
        stacks.append(facts.Stack(name=c.name, dirs=tuple(layer.path for layer in c.layers), facts=layer_facts, hostapp=d is None))
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
    """
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
    if not os.statvfs(target).f_flag & os.ST_RDONLY:
        raise HostappError(f"{target} was mounted but is not read-only; refusing to hand it over")
    return plan, fallbacks


def describe_selection(plan: Plan) -> list[str]:
    """One console line per decision."""
    h = plan.hostapp
    lines = [f"hostapp {shown(h.name)} ({h.id[:12]}): {len(h.layers)} layers"]
    if plan.disabled_reason:
        lines.append(plan.disabled_reason)
    for d in plan.decisions:
        name = shown(d.extension.name)
        if d.warning:
            lines.append(f"extension {name}: warning: {d.warning}")
        if d.included:
            where = f"override {d.priority if d.priority is not None else '(unranked)'}" if d.position == OVERRIDE else "normal"
            lines.append(f"extension {name}: included, {where}")
        else:
            lines.append(f"extension {name}: skipped: {d.reason}")
    return lines


def assemble(
    *,
    sysroot: str,
    data: str | None,
    target: str,
    cmdline: str,
    kernel_release: str,
    page_size: int,
    workdir: str = DEFAULT_WORKDIR,
    log: Callable[[str], None] = lambda line: None,
    hostapp_store: str | None = None,
    data_store: str | None = None,
    purge_marker: str | None = None,
    extensions: bool = True,
    layout: str | None = None,
    attempts_file: str | None = None,
    data_reason: str | None = None,
) -> dict[str, object]:
    """Mount the read-only root at `target`; return the record of what was done.

    With `attempts_file`, boots with extensions are counted there, and after
    `mobynit.max_tries` unconfirmed ones the hostapp is mounted alone (see attempts.py).
    `data_reason`: why `data` is None, said once instead of a generic line.
    """
    timings: dict[str, float] = {}
    where = locate(sysroot, data, hostapp_store=hostapp_store, data_store=data_store, purge_marker=purge_marker)
    args = Cmdline(cmdline)
    sel = select(where, args, kernel_release, extensions=extensions, timings=timings, data_reason=data_reason)
    exclude: dict[str, str] = {}
    first = None
    tries = previous = None
    dry_seconds = 0.0
    if attempts_file is not None:
        from mobynit.core import attempts

        tries = attempts.max_tries(args.get(attempts.CMDLINE_MAX_TRIES), log)
        previous = attempts.read(attempts_file)
        t0 = time.perf_counter()
        first = make_plan(sel, target=target, workdir=workdir, page_size=page_size, layout=layout)
        dry_seconds = time.perf_counter() - t0
        planned = [d.extension.id for d in first.included]
        _, giving_up = attempts.at_boot(previous, planned, tries)
        if giving_up is not None:
            log(giving_up)
            exclude = dict.fromkeys(planned, giving_up)
            first = None  # that plan had the extensions in: make the hostapp-only one
    plan, fallbacks = mount_plan(
        sel, target=target, workdir=workdir, page_size=page_size, log=log, layout=layout, timings=timings,
        exclude=exclude, first=first,
    )
    timings["plan"] = round(timings["plan"] + dry_seconds * 1000, 3)  # the first plan was made above
    for line in describe_selection(plan):
        log(line)
    n = len(plan.included)
    if n:
        how = f"{plan.layout} ({plan.mechanism}), stacking depth {plan.stacking_depth}"
        log(f"layout {how}: {plan.layout_reason}" if plan.layout_reason else f"layout {how}")
    log(f"root mounted read-only at {target}: hostapp and {n} extension{'s' if n != 1 else ''}")
    record = plan.as_json()
    record["fallbacks"] = fallbacks
    record["timings_ms"] = timings
    if attempts_file is not None and previous is not None and tries is not None:
        record["attempts"] = _count_attempt(attempts_file, previous, plan, exclude, tries, log)
    return record


def _count_attempt(path: str, previous: Attempts, plan: Plan, exclude: Mapping[str, str], tries: int,
                   log: Callable[[str], None]) -> dict[str, object]:
    """Record this boot in the attempts file; a failure to write is a warning, never a failed boot."""
    from mobynit.core import attempts

    mounted = list(exclude) if exclude else [d.extension.id for d in plan.included]
    now, giving_up = attempts.at_boot(previous, mounted, tries)
    if now != previous:
        try:
            attempts.write(path, now)
        except OSError as e:
            log(f"warning: cannot record this boot attempt in {path}: {e.strerror}")
    return {"file": path, "extensions": list(now.extensions), "unconfirmed": now.unconfirmed,
            "max_tries": tries, "fallback": now.fallback, "reason": giving_up}


def write_record(path: str, record: Mapping[str, object]) -> None:
    """Write atomically: a reader sees the old record or the new one, never half."""
    from mobynit.core import jsonio

    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        # Compact, by the C encoder: indented output is pure Python (40 ms for 500 extensions).
        f.write(jsonio.dumps(record))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def index_stores(where: Layout, kernel_release: str, force: bool = False) -> tuple[int, int]:
    """Record the facts of every layer of the hostapp and of each readable
    extension (`mobynit index`); returns (layers walked, layers in all)."""
    from mobynit.core import facts

    sel = select(where, Cmdline(""), kernel_release)
    containers = [sel.hostapp] + [d.extension.container for d in sel.decisions if d.extension.container]
    layers = {layer.id: os.path.dirname(layer.path) for c in containers for layer in c.layers}
    try:
        written = facts.index(sorted(layers.items()), force=force)
    except OSError as e:
        raise StoreError(f"cannot record layer facts: {e.filename}: {e.strerror}") from None
    return len(written), len(layers)
