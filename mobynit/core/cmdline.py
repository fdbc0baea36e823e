"""The kernel command line, read the way the kernel reads it.

The Go tool matched its switches as substrings of any token, so
`mobynit.no_overlays=0` disabled overlays and `foo.emergency_x` would have
too. Here a switch is a parameter name, compared whole, and its value says
whether it is on.
"""

from __future__ import annotations

# Parameters that turn extensions off, oldest first (docs/decisions.md).
EXTENSION_SWITCHES = ("balena.nohostext", "balena.disable_overlays", "mobynit.no_overlays")
TRUE_WORDS = frozenset(("1", "y", "yes", "true", "on"))
FALSE_WORDS = frozenset(("0", "n", "no", "false", "off"))
EMERGENCY_UNITS = frozenset(("emergency.target",))
_SWITCH_KEYS = frozenset(name.replace("-", "_") for name in (*EXTENSION_SWITCHES, "emergency"))


_SPACE = frozenset(" \t\n\v\f\r")  # the kernel's isspace()


def split(text: str) -> list[tuple[str, str | None]]:
    """Split like the kernel's next_arg(): whitespace separates, double quotes
    group, and the quotes around a value or around a whole parameter go.

    Returns (name, value) pairs in order; value is None for a bare parameter.
    Parsing stops at "--": what follows is for init, not for the kernel.
    """
    params: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in _SPACE:
            i += 1
            continue
        quoted = text[i] == '"'
        if quoted:
            i += 1
        start, in_quote, equals = i, quoted, -1
        while i < n and (in_quote or text[i] not in _SPACE):
            if equals < 0 and text[i] == "=" and i > start:
                equals = i
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        end = i
        closing = end > start and text[end - 1] == '"'
        if equals < 0:
            name = text[start : end - 1] if quoted and closing else text[start:end]
            if name == "--":  # parse_args() compares after the quotes are gone
                break
            params.append((name, None))
            continue
        vstart = equals + 1
        if vstart < end and text[vstart] == '"':
            vstart += 1
            quoted = True
        vend = end - 1 if quoted and closing and end - 1 >= vstart else end
        params.append((text[start:equals], text[vstart:vend]))
    return params


def _key(name: str) -> str:
    """Dashes and underscores are the same in parameter names (kernel and systemd)."""
    return name.replace("-", "_")


class Cmdline:
    """Parameters by name, the last occurrence winning, as the kernel does."""

    __slots__ = ("text", "params", "order")

    def __init__(self, text: str) -> None:
        self.text = text
        self.order = split(text)
        self.params: dict[str, tuple[str, str | None]] = {_key(k): (k, v) for k, v in self.order}

    def has(self, name: str) -> bool:
        return _key(name) in self.params

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of `name`; `default` when absent or bare."""
        value = self.params.get(_key(name), (name, None))[1]
        return default if value is None else value

    def flag(self, name: str) -> bool:
        """True when `name` is present bare or with a value that does not say no."""
        entry = self.params.get(_key(name))
        return entry is not None and not is_false(entry[1])

    def token(self, name: str) -> str:
        """The parameter as written on the command line (its last occurrence)."""
        written, value = self.params[_key(name)]
        return written if value is None else f"{written}={value}"

    def extensions_disabled_by(self) -> str | None:
        """The parameter that turns extensions off, or None.

        An unrecognised value (`balena.nohostext=maybe`) turns them off: the
        switch exists to get a broken device back, so doubt errs towards off.
        When several apply, the first on the command line is named.
        """
        for name, _ in self.order:
            key = _key(name)
            if key in _SWITCH_KEYS and self.flag(key):
                return self.token(key)
            if key == "systemd.unit" and self.get(key) in EMERGENCY_UNITS:
                return self.token(key)
        return None


def is_false(value: str | None) -> bool:
    return value is not None and value.lower() in FALSE_WORDS


def is_true(value: str | None) -> bool:
    """Bare or an affirmative word: how a boolean parameter is switched on."""
    return value is None or value.lower() in TRUE_WORDS


def parse(text: str) -> Cmdline:
    return Cmdline(text)


def read(path: str = "/proc/cmdline") -> Cmdline:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return Cmdline(f.read())
