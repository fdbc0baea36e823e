"""The boot record: what was mounted and why, written at boot, read by `mobynit status`.

One class writes it and reads it back (`BootRecord.as_json` and
`BootRecord.from_json`), so the two can never disagree about a field. The
shape is the plan document (docs/plan-json.md) plus what only a real run
knows: the fallbacks taken, the timings, the boot attempts counted and, at
boot, the initramfs's own account (partitions, phases, handover).
Reading validates every field's type: a record is data on a writable /run,
and `status` must say what is wrong with it, not raise a traceback.
"""

from __future__ import annotations

from mobynit.core import jsonio
from mobynit.core.errors import MobynitError, StoreError, shown
from mobynit.core.fileio import make_dirs, read_file, write_atomic
from mobynit.core.model import Record
from mobynit.core.paths import dirname

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from mobynit.core.model import Decision
    from mobynit.core.plan import Plan

VERSION = 1
RECORD_LIMIT = 16 << 20
DEFAULT_RECORD = "/run/mobynit/boot.json"  # where the booted system finds it
LIVE_RECORD = "run/mobynit/live.json"  # beside it, relative to the root that `mobynit merge` changed


class RecordError(MobynitError):
    """A boot record that cannot be read or is not one; names the file."""


class Entry(Record):
    """One extension's decision, as recorded and as shown."""

    __slots__ = ("id", "name", "included", "position", "priority", "layers", "reason", "warning")
    id: str
    name: str
    included: bool
    position: str
    priority: int | None
    layers: int
    reason: str | None
    warning: str | None

    @classmethod
    def from_decision(cls, d: Decision) -> Entry:
        ext = d.extension
        return cls(
            id=ext.id, name=ext.name, included=d.included, position=d.position, priority=d.priority,
            layers=len(ext.container.layers) if ext.container else 0, reason=d.reason, warning=d.warning,
        )

    def as_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "id": self.id, "name": self.name, "included": self.included, "position": self.position,
            "priority": self.priority, "layers": self.layers,
        }
        if self.reason is not None:
            doc["reason"] = self.reason
        if self.warning is not None:
            doc["warning"] = self.warning
        return doc


class Hostapp(Record):
    __slots__ = ("id", "name", "layers")
    id: str
    name: str
    layers: tuple[str, ...]


class Counted(Record):
    """The boot attempts after this boot (docs/fallback.md)."""

    __slots__ = ("file", "extensions", "unconfirmed", "max_tries", "fallback", "reason")
    file: str
    extensions: tuple[str, ...]
    unconfirmed: int
    max_tries: int
    fallback: bool
    reason: str | None  # why extensions were left off, when they were


class Partition(Record):
    """A partition the initramfs looked for: how it was named, what it was, why
    it was not used, and the partitions elsewhere carrying its name that were
    not trusted (docs/boot.md)."""

    __slots__ = ("spec", "device", "fstype", "reason", "ignored")
    _defaults = {"fstype": None, "reason": None, "ignored": ()}
    spec: str
    device: str | None
    fstype: str | None
    reason: str | None
    ignored: tuple[str, ...]


class BootInfo(Record):
    """The initramfs's part: when things happened (seconds since the kernel started) and what it found."""

    __slots__ = ("init_start", "modules_loaded", "python_start", "python_ready", "cmdline", "root", "data", "init",
                 "phases", "handover")
    init_start: float | None
    modules_loaded: float | None
    python_start: float
    python_ready: float
    cmdline: str
    root: Partition | None
    data: Partition | None
    init: str
    phases: Mapping[str, float]
    handover: float


class BootRecord(Record):
    __slots__ = ("hostapp", "extensions", "disabled_by", "disabled_reason", "kernel_release", "page_size", "target",
                 "layout", "layout_reason", "mechanism", "stacking_depth", "mounts", "fallbacks", "timings_ms",
                 "attempts", "boot")
    _defaults = {"mounts": (), "fallbacks": (), "timings_ms": None, "attempts": None, "boot": None}
    hostapp: Hostapp
    extensions: tuple[Entry, ...]
    disabled_by: str | None
    disabled_reason: str | None
    kernel_release: str
    page_size: int
    target: str
    layout: str
    layout_reason: str | None
    mechanism: str
    stacking_depth: int
    mounts: tuple[Mapping[str, object], ...]  # the plan's operations, as Operation.as_json() gives them
    fallbacks: tuple[str, ...]
    timings_ms: Mapping[str, float] | None
    attempts: Counted | None
    boot: BootInfo | None

    @classmethod
    def from_plan(cls, plan: Plan, **extra: object) -> BootRecord:
        h = plan.hostapp
        return cls(
            hostapp=Hostapp(id=h.id, name=h.name, layers=tuple(layer.path for layer in h.layers)),
            extensions=tuple(Entry.from_decision(d) for d in plan.decisions),
            disabled_by=plan.disabled_by, disabled_reason=plan.disabled_reason,
            kernel_release=plan.kernel_release, page_size=plan.page_size, target=plan.target,
            layout=plan.layout, layout_reason=plan.layout_reason, mechanism=plan.mechanism,
            stacking_depth=plan.stacking_depth, mounts=tuple(op.as_json() for op in plan.operations), **extra,
        )

    @property
    def included(self) -> list[Entry]:
        return [e for e in self.extensions if e.included]

    def as_json(self, plan_only: bool = False) -> dict[str, object]:
        """The plan document (`plan_only`), or the whole record."""
        doc: dict[str, object] = {"version": VERSION}
        for key in self.__slots__:
            value = getattr(self, key)
            if plan_only and key in _RECORD_ONLY:
                continue
            if key == "boot" and value is None:
                continue  # only boot has its own account
            doc[key] = _plain(value)
        return doc

    @classmethod
    def from_json(cls, doc: object, where: str) -> BootRecord:
        """The record in `doc` (parsed JSON), every type checked; RecordError naming `where`."""
        try:
            return _read(cls, doc, "")
        except _Bad as e:
            raise RecordError(f"{where}: not a mobynit boot record: {e}") from None

    def write(self, path: str) -> None:
        _write(self.as_json(), path)

    @classmethod
    def read(cls, path: str) -> BootRecord:
        doc = _load(path, "boot record")
        if doc is None:
            raise RecordError(f"no boot record at {path}: this system was not booted by mobynit")
        return cls.from_json(doc, path)


class LiveEntry(Record):
    """One extension `mobynit merge` considered: a sysext image or a container extension."""

    __slots__ = ("name", "kind", "source", "merged", "hierarchies", "reason", "warning")
    name: str
    kind: str  # directory, squashfs, erofs, container
    source: str  # the image's path, or the container's id
    merged: bool
    hierarchies: tuple[str, ...]  # the hierarchies it has files in, when merged
    reason: str | None  # why it is not merged
    warning: str | None


class LiveRecord(Record):
    """What is merged into the running system now (mobynit.tools.live), beside the boot record.

    `state` is "merged" or "unmerged", or "pending" while a command is between
    writing this record and attaching its overlays: a record still pending
    when read means that command was interrupted, and the mount table (each
    overlay's source names its `generation`) tells what really happened.
    """

    __slots__ = ("generation", "state", "hierarchies", "mechanism", "extensions")
    generation: int
    state: str
    hierarchies: tuple[str, ...]  # the hierarchies overlaid
    mechanism: str  # how the last overlays were put in place: attach, beneath or replace
    extensions: tuple[LiveEntry, ...]

    def as_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"version": VERSION}
        doc.update({key: _plain(getattr(self, key)) for key in self.__slots__})
        return doc

    @classmethod
    def from_json(cls, doc: object, where: str) -> LiveRecord:
        try:
            if not isinstance(doc, dict) or doc.get("version") != VERSION:
                raise _Bad(f"not version {VERSION}")
            return _read(cls, doc, "")  # type: ignore[return-value]
        except _Bad as e:
            raise RecordError(f"{where}: not a mobynit live record: {e}") from None

    def write(self, path: str) -> None:
        _write(self.as_json(), path)

    @classmethod
    def read(cls, path: str) -> LiveRecord | None:
        """The record, or None when there is none (nothing was ever merged live)."""
        doc = _load(path, "live record")
        return None if doc is None else cls.from_json(doc, path)


def _load(path: str, what: str) -> object | None:
    """A record file's JSON, parsed; None when there is no such file; RecordError
    naming the file when it cannot be read or parsed."""
    try:
        raw = read_file(path, RECORD_LIMIT)
    except StoreError as e:
        if str(e).endswith(": missing"):
            return None
        raise RecordError(f"cannot read the {what} {e}") from None
    try:
        return jsonio.loads(raw)
    except (ValueError, RecursionError) as e:
        raise RecordError(f"{path} is not valid JSON: {e}") from None


def _write(doc: dict[str, object], path: str) -> None:
    """A record, atomically and durably, its directory made if need be; compact, by the C
    encoder (indented output is pure Python, 40 ms for 500 extensions). Raises StoreError
    naming the file."""
    directory = dirname(path) or "."
    try:
        make_dirs(directory)
    except OSError as e:
        raise StoreError(f"{directory}: cannot create: {e.strerror}") from None
    write_atomic(path, (jsonio.dumps(doc) + "\n").encode())


_RECORD_ONLY = frozenset(("fallbacks", "timings_ms", "attempts", "boot"))


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _plain(value: object) -> object:
    """A record's value as JSON data: records become objects, tuples lists. Scalars are
    passed through without a call each: a plan's mounts list 500 layer paths."""
    if type(value) in _SCALARS:
        return value
    if isinstance(value, Entry):
        return value.as_json()
    if isinstance(value, Record):
        return {k: _plain(getattr(value, k)) for k in value.__slots__}
    if isinstance(value, (tuple, list)):
        return [v if type(v) in _SCALARS else _plain(v) for v in value]
    if isinstance(value, dict):
        return {k: v if type(v) in _SCALARS else _plain(v) for k, v in value.items()}
    return value


# --- reading, with every type checked -----------------------------------------------

class _Bad(Exception):
    pass


# What each field must be: a type, a tuple of types (None allowed as type(None)),
# a record class, or ("list", element kind) / ("map", value type).
_NONE = type(None)
_STR, _OSTR, _INT, _OINT, _BOOL = str, (str, _NONE), int, (int, _NONE), bool
_NUM, _ONUM = (int, float), (int, float, _NONE)
_FIELDS: dict[type, dict[str, object]] = {
    Entry: {"id": _STR, "name": _STR, "included": _BOOL, "position": _STR, "priority": _OINT, "layers": _INT,
            "reason": _OSTR, "warning": _OSTR},
    Hostapp: {"id": _STR, "name": _STR, "layers": ("list", _STR)},
    Counted: {"file": _STR, "extensions": ("list", _STR), "unconfirmed": _INT, "max_tries": _INT,
              "fallback": _BOOL, "reason": _OSTR},
    Partition: {"spec": _STR, "device": _OSTR, "fstype": _OSTR, "reason": _OSTR, "ignored": ("list", _STR)},
    BootInfo: {"init_start": _ONUM, "modules_loaded": _ONUM, "python_start": _NUM, "python_ready": _NUM,
               "cmdline": _STR, "root": (Partition, _NONE), "data": (Partition, _NONE), "init": _STR,
               "phases": ("map", _NUM), "handover": _NUM},
    BootRecord: {"hostapp": Hostapp, "extensions": ("list", Entry), "disabled_by": _OSTR, "disabled_reason": _OSTR,
                 "kernel_release": _STR, "page_size": _INT, "target": _STR, "layout": _STR, "layout_reason": _OSTR,
                 "mechanism": _STR, "stacking_depth": _INT, "mounts": ("list", dict),
                 "fallbacks": ("list", _STR), "timings_ms": (("map", _NUM), _NONE), "attempts": (Counted, _NONE),
                 "boot": (BootInfo, _NONE)},
    LiveEntry: {"name": _STR, "kind": _STR, "source": _STR, "merged": _BOOL, "hierarchies": ("list", _STR),
                "reason": _OSTR, "warning": _OSTR},
    LiveRecord: {"generation": _INT, "state": _STR, "hierarchies": ("list", _STR), "mechanism": _STR,
                 "extensions": ("list", LiveEntry)},
}
_OPTIONAL = {Entry: ("reason", "warning"), Partition: ("fstype", "reason", "ignored"), BootRecord: ("boot",)}


def _read(cls: type, doc: object, where: str) -> Record:
    if not isinstance(doc, dict):
        raise _Bad(f"{where or 'the record'} is not an object")
    if cls is BootRecord and doc.get("version") != VERSION:
        raise _Bad(f"version {shown(doc.get('version'), 20)}, this mobynit reads version {VERSION}")
    values = {}
    for key, kind in _FIELDS[cls].items():
        path = f"{where}.{key}" if where else key
        if key not in doc:
            if key in _OPTIONAL.get(cls, ()):
                values[key] = cls._defaults.get(key)  # type: ignore[attr-defined]
                continue
            raise _Bad(f"{path} is missing")
        values[key] = _value(kind, doc[key], path)
    return cls(**values)  # type: ignore[no-any-return]


def _value(kind: object, value: object, path: str) -> object:
    if isinstance(kind, tuple) and kind and kind[0] in ("list", "map"):
        container, inner = kind
        if container == "list":
            if not isinstance(value, list):
                raise _Bad(f"{path} is not a list")
            return tuple(_value(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, dict):
            raise _Bad(f"{path} is not an object")
        return {str(k): _value(inner, v, f"{path}.{k}") for k, v in value.items()}
    options = kind if isinstance(kind, tuple) else (kind,)
    for option in options:
        if isinstance(option, tuple):  # a list or map, or None
            try:
                return _value(option, value, path)
            except _Bad:
                continue
        if option in _FIELDS and isinstance(value, dict):
            return _read(option, value, path)  # type: ignore[arg-type]
        if isinstance(option, type) and option not in _FIELDS and _is(value, option):
            return value
    raise _Bad(f"{path} has the wrong type ({type(value).__name__})")


def _is(value: object, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool  # JSON true is not a number here
    return isinstance(value, kind)
