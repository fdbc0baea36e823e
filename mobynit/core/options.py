"""A small command-line option parser, because argparse costs the boot path.

argparse pulls in re, gettext and locale: about 15 ms of a 35 ms budget for
a whole `mobynit assemble`. Commands here are declared as data (a name, a
help line, options) and parsed in one loop: `--name VALUE`, `--name=VALUE`
and flags; `--help` anywhere prints the command's help. Errors raise
UsageError with a sentence, like everything else in mobynit.
"""

from __future__ import annotations

from mobynit.core.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class Opt:
    """One option: `--name METAVAR` (or a flag when metavar is None)."""

    __slots__ = ("name", "metavar", "help", "default", "required", "choices", "convert", "dest", "const", "hidden")

    def __init__(
        self,
        name: str,
        metavar: str | None = None,
        help: str = "",
        *,
        default: object = None,
        required: bool = False,
        choices: Sequence[str] | None = None,
        convert: Callable[[str], object] | None = None,
        dest: str | None = None,
        const: object = True,
        hidden: bool = False,
    ) -> None:
        self.name = name
        self.metavar = metavar
        self.help = help
        self.default = default
        self.required = required
        self.choices = choices
        self.convert = convert
        self.dest = dest or name.lstrip("-").replace("-", "_")
        self.const = const  # what a flag stores
        self.hidden = hidden


class Command:
    """A subcommand: its options, the groups of which at most one may be given,
    and what runs it (a function, or "module:function" imported only when used)."""

    __slots__ = ("name", "help", "options", "exclusive", "run")

    def __init__(
        self,
        name: str,
        help: str,
        options: Sequence[Opt],
        run: Callable[[Args], int] | str,
        exclusive: Sequence[tuple[str, ...]] = (),
    ) -> None:
        self.name = name
        self.help = help
        self.options = tuple(options)
        self.exclusive = tuple(exclusive)
        self.run = run

    def function(self) -> Callable[[Args], int]:
        if callable(self.run):
            return self.run
        module, _, name = self.run.partition(":")
        return getattr(__import__(module, fromlist=[name]), name)  # type: ignore[no-any-return]

    def usage(self, prog: str) -> str:
        lines = [f"usage: {prog} {self.name} [options]", "", self.help, "", "options:"]
        rows = [(("  " + o.name + (f" {o.metavar}" if o.metavar else "")), o.help) for o in self.options if not o.hidden]
        rows.append(("  --help", "show this help and exit"))
        width = max(len(left) for left, _ in rows) + 2
        lines += [f"{left:<{width}}{text}" for left, text in rows]
        return "\n".join(lines) + "\n"


class Args:
    """The parsed options, as attributes."""

    def __init__(self, values: dict[str, object]) -> None:
        self.__dict__.update(values)


def parse(command: Command, argv: Sequence[str], prog: str) -> Args | None:
    """Parse `argv` (the words after the command name); None when --help was asked."""
    by_name = {o.name: o for o in command.options}
    values: dict[str, object] = {o.dest: o.default for o in command.options}
    given: set[str] = set()
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word in ("-h", "--help"):
            return None
        name, eq, inline = word.partition("=")
        opt = by_name.get(name)
        if opt is None:
            if word.startswith("-"):
                near = closest(name, [o.name for o in command.options if not o.hidden])
                hint = f" (did you mean {near}?)" if near else ""
            else:
                hint = " (this command takes no positional arguments)"
            raise UsageError(f"{command.name}: unknown option {word!r}{hint}; see {prog} {command.name} --help")
        if opt.metavar is None:
            if eq:
                raise UsageError(f"{command.name}: {name} takes no value")
            values[opt.dest] = opt.const
        else:
            if eq:
                value = inline
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise UsageError(f"{command.name}: {name} needs a value ({opt.metavar})")
            if opt.choices is not None and value not in opt.choices:
                raise UsageError(f"{command.name}: {name} must be one of {', '.join(opt.choices)}, not {value!r}")
            if opt.convert is not None:
                try:
                    values[opt.dest] = opt.convert(value)
                except ValueError:
                    raise UsageError(f"{command.name}: {name} {value!r} is not a valid {opt.metavar}") from None
            else:
                values[opt.dest] = value
        given.add(opt.name)
    for group in command.exclusive:
        both = [n for n in group if n in given]
        if len(both) > 1:
            raise UsageError(f"{command.name}: {' and '.join(both)} cannot be used together")
    missing = [o.name for o in command.options if o.required and o.name not in given]
    if missing:
        raise UsageError(f"{command.name}: {', '.join(missing)} is required")
    return Args(values)


def closest(word: str, names: Sequence[str]) -> str | None:
    """The name nearest to a mistyped `word` (edit distance at most 2, or a
    third of a long word's length, never over 3), for "did you mean"; None
    when nothing is that close."""
    best, best_cost = None, min(3, max(2, len(word) // 3)) + 1
    for name in names:
        cost = _distance(word, name)
        if cost < best_cost:
            best, best_cost = name, cost
    return best


def _distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions, substitutions."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def overview(prog: str, summary: str, commands: Sequence[Command]) -> str:
    width = max(len(c.name) for c in commands) + 4
    lines = [f"usage: {prog} COMMAND [options]", "", summary, "", "commands:"]
    lines += [f"  {c.name:<{width}}{c.help}" for c in commands]
    lines += ["", f"{prog} COMMAND --help shows a command's options."]
    return "\n".join(lines) + "\n"
