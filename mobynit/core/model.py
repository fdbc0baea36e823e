"""The data model: what the store holds and what the selection decided.

These are frozen records. They are not attrs classes because they sit on the
boot path, where importing attrs alone costs more than a whole assemble; the
small `Record` base gives the same guarantees (immutable, compared and shown
by value) for the price of a class statement.
"""

from __future__ import annotations

TYPE_CHECKING = False  # `import typing` costs ~10 ms at boot
if TYPE_CHECKING:
    from collections.abc import Mapping

    from mobynit.core.facts import LayerFacts


class Record:
    """A frozen value object whose fields are its `__slots__`."""

    __slots__ = ()
    _defaults: dict[str, object] = {}  # fields that may be left out

    def __init__(self, *args: object, **kwargs: object) -> None:
        fields = self.__slots__
        if args or len(kwargs) != len(fields):  # every field by name is the common case, on the boot path
            kwargs = self._complete(args, kwargs)
        setter = object.__setattr__
        try:
            for key in fields:
                setter(self, key, kwargs[key])
        except KeyError as e:
            raise TypeError(f"{type(self).__name__}: unknown field given instead of {e}") from None

    def _complete(self, args: tuple[object, ...], kwargs: dict[str, object]) -> dict[str, object]:
        """Every field by name: the positional ones named, the defaults added, anything else refused."""
        fields = self.__slots__
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes {len(fields)} fields")
        for key, value in zip(fields, args):
            if key in kwargs:
                raise TypeError(f"{type(self).__name__}: field {key!r} given twice")
            kwargs[key] = value
        for key, value in self._defaults.items():
            kwargs.setdefault(key, value)
        if len(kwargs) != len(fields):
            unknown = set(kwargs) - set(fields)
            missing = set(fields) - set(kwargs)
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
        return kwargs

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(_hashable(v) for v in self._values())))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({inner})"

    def replace(self, **changes: object):  # type: ignore[no-untyped-def]
        values = {f: getattr(self, f) for f in self.__slots__}
        values.update(changes)
        return type(self)(**values)


def _hashable(value: object) -> object:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, list):
        return tuple(value)
    return value


class Layer(Record):
    """One read-only layer directory of an overlay2 store.

    `path` is the absolute `overlay2/<id>/diff`; `link` names it relative to
    the store's overlay2 directory: the short `l/<26 chars>` alias for image
    layers, `<id>/diff` for a container's own diff, which has no alias.
    """

    __slots__ = ("id", "path", "link", "facts")
    _defaults = {"facts": None}
    id: str
    path: str
    link: str
    facts: LayerFacts | None  # what `mobynit index` recorded about it, if anything (mobynit.core.facts)


class Container(Record):
    """A container as the engine left it in `containers/<id>/config.v2.json`.

    `layers` is the read-only stack to mount, top first: the container's own
    diff when it holds anything, then its image layers; never the `-init` layer.
    `overlay2` is the store's layer directory, which relative links resolve against.
    """

    __slots__ = ("id", "name", "labels", "state", "layers", "overlay2", "config")
    id: str
    name: str
    labels: Mapping[str, str]
    state: str | None  # None, "Dead" or "RemovalInProgress"
    layers: tuple[Layer, ...]
    overlay2: str
    config: str


class KernelModules(Record):
    """What an extension carries under /lib/modules/<running release>.

    `symvers_sha256` is the sha256 of its Module.symvers (the extension's
    kernel ABI id), or None when the directory has no Module.symvers.
    """

    __slots__ = ("release", "symvers_sha256")
    release: str
    symvers_sha256: str | None


class Extension(Record):
    """An extension found on the data partition: a container of the data store,
    or a systemd-sysext image (`image` names its kind, mobynit.core.images).

    Either `container` is set, or `fault` says in one line (naming the file)
    why it could not be read; `name` is then the best name known. An image
    is a one-layer `container` without labels, `rank` its place among the
    images, top first.
    `modules` is None when the extension has no modules for the running kernel;
    `release` is its systemd-sysext extension-release file, when it has one.
    """

    __slots__ = ("id", "name", "container", "modules", "fault", "release", "release_name", "image", "rank")
    _defaults = {"release": None, "release_name": None, "image": None, "rank": None}
    id: str
    name: str
    container: Container | None
    modules: KernelModules | None
    fault: str | None
    release: Mapping[str, str] | None  # its extension-release file, parsed; None without one
    release_name: str | None  # the <name> of that extension-release.<name> file
    image: str | None  # "directory", "squashfs" or "erofs" for a sysext image; None for a container
    rank: int | None  # an image's place among the images, 0 on top (the highest version)


OVERRIDE = "override"
NORMAL = "normal"
SYSEXT = "sysext"


class Decision(Record):
    """What the selection made of one extension.

    `position` is "override" (left of the hostapp, may replace its files),
    "sysext" (an image: left of the hostapp, below the overrides, as
    systemd-sysext stacks images over /usr) or "normal" (right of the
    hostapp, may only add); `priority` is the override's integer
    N, None otherwise. `reason` is set exactly when the extension is left out.
    """

    __slots__ = ("extension", "included", "position", "priority", "reason", "warning")
    extension: Extension
    included: bool
    position: str
    priority: int | None
    reason: str | None
    warning: str | None

    def drop(self, reason: str) -> Decision:
        return self.replace(included=False, reason=reason)
