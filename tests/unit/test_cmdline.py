"""The kernel command line, read as the kernel's next_arg() reads it (kernel/params.c)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobynit.core.cmdline import EXTENSION_SWITCHES, Cmdline, is_false, is_true, split

PROPS = settings(max_examples=200, deadline=None)


# -- split: the kernel's tokenizer ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \t\n ", []),
        ("a", [("a", None)]),
        ("a b", [("a", None), ("b", None)]),
        ("a\tb\nc\rd\ve\ff", [(x, None) for x in "abcdef"]),
        ("  root=/dev/sda2   ro  ", [("root", "/dev/sda2"), ("ro", None)]),
        ("x=", [("x", "")]),
        ("x=a=b", [("x", "a=b")]),
        # The first "=" splits, but a leading "=" is part of the name (equals == 0 in next_arg).
        ("=x", [("=x", None)]),
        ("=x=y", [("=x", "y")]),
        # Quoted values lose their quotes and keep their spaces.
        ('x="a b"', [("x", "a b")]),
        ('x="a\tb" y', [("x", "a\tb"), ("y", None)]),
        ('x=""', [("x", "")]),
        ('x="', [("x", "")]),
        # A quote that does not close at the end of the token stays.
        ('x="a b"c', [("x", 'a b"c')]),
        ('x=a"b c"', [("x", 'a"b c"')]),
        # Quoted whole parameters: the quotes around the token go, the "=" inside still splits.
        ('"a b=c"', [("a b", "c")]),
        ('"a b"', [("a b", None)]),
        ('""', [("", None)]),
        ('"x="ab"', [("x", "ab")]),
        # An unbalanced quote swallows the whitespace after it.
        ('abc" def', [('abc" def', None)]),
        # "--" ends the kernel's parameters: the rest is for init.
        ("a -- b c=d", [("a", None)]),
        ("a --x b", [("a", None), ("--x", None), ("b", None)]),
        ("a --=1 b", [("a", None), ("--", "1"), ("b", None)]),
        ("-- balena.nohostext", []),
    ],
)
def test_split_examples(text: str, expected: list[tuple[str, str | None]]) -> None:
    assert split(text) == expected


def test_quoted_double_dash_also_ends_parameters() -> None:
    """next_arg() strips the quotes of `"--"` before parse_args() compares it with "--"."""
    assert split('a "--" balena.nohostext') == [("a", None)]


_KSPACE = " \t\n\v\f\r"


def kernel_parse(text: str) -> list[tuple[str, str | None]]:
    """A line-by-line transliteration of next_arg() and parse_args() (lib/cmdline.c,
    kernel/params.c), NUL terminators and all: the oracle for split()."""
    s = [*text, "\0"]

    def cstr(at: int) -> str:
        end = at
        while s[end] != "\0":
            end += 1
        return "".join(s[at:end])

    def skip_spaces(at: int) -> int:
        while s[at] in _KSPACE and s[at] != "\0":
            at += 1
        return at

    out: list[tuple[str, str | None]] = []
    pos = skip_spaces(0)
    while s[pos] != "\0":
        args, in_quote, quoted = pos, False, False
        if s[args] == '"':
            args += 1
            in_quote = quoted = True
        i = equals = 0
        while s[args + i] != "\0":
            if s[args + i] in _KSPACE and not in_quote:
                break
            if equals == 0 and s[args + i] == "=":
                equals = i
            if s[args + i] == '"':
                in_quote = not in_quote
            i += 1
        val: int | None = None
        if equals:
            s[args + equals] = "\0"
            val = args + equals + 1
            if s[val] == '"':
                val += 1
                if s[args + i - 1] == '"':
                    s[args + i - 1] = "\0"
        if quoted and i > 0 and s[args + i - 1] == '"':
            s[args + i - 1] = "\0"
        if s[args + i] != "\0":
            s[args + i] = "\0"
            nxt = args + i + 1
        else:
            nxt = args + i
        param, value = cstr(args), None if val is None else cstr(val)
        if value is None and param == "--":
            break
        out.append((param, value))
        pos = skip_spaces(nxt)
    return out


@pytest.mark.parametrize("text", ['a "--" b', 'x="a b"c', '"x="ab"', '""', 'x="', '"a b=c"', "=x=y", "a -- b"])
def test_oracle_agrees_with_the_examples(text: str) -> None:
    """The oracle itself, checked against hand-derived expectations above."""
    expected = {
        'a "--" b': [("a", None)],
        'x="a b"c': [("x", 'a b"c')],
        '"x="ab"': [("x", "ab")],
        '""': [("", None)],
        'x="': [("x", "")],
        '"a b=c"': [("a b", "c")],
        "=x=y": [("=x", "y")],
        "a -- b": [("a", None)],
    }
    assert kernel_parse(text) == expected[text]


@settings(max_examples=500, deadline=None)
@given(st.text(' \t\n"=-ab', max_size=24))
def test_split_matches_the_kernel_on_arbitrary_text(text: str) -> None:
    assert split(text) == kernel_parse(text)


# -- Cmdline: last occurrence wins, dashes equal underscores ----------------------------


def test_last_occurrence_wins() -> None:
    c = Cmdline("balena_kernel_abi=aaa x=1 balena_kernel_abi=bbb")
    assert c.get("balena_kernel_abi") == "bbb"
    assert c.get("x") == "1"
    assert c.get("absent") is None
    assert c.get("absent", "d") == "d"


def test_bare_parameter_has_no_value() -> None:
    c = Cmdline("quiet x=")
    assert c.has("quiet")
    assert c.get("quiet") is None
    assert c.get("quiet", "d") == "d"
    assert c.get("x") == ""
    assert not c.has("loud")


def test_dash_and_underscore_are_the_same_in_names() -> None:
    c = Cmdline("balena-kernel-abi=abc some_thing")
    assert c.get("balena_kernel_abi") == "abc"
    assert c.has("some-thing")
    assert c.token("balena_kernel_abi") == "balena-kernel-abi=abc"


def test_names_are_case_sensitive() -> None:
    assert Cmdline("Balena.NoHostExt").extensions_disabled_by() is None


# -- switches --------------------------------------------------------------------------

ON_WORDS = ["1", "y", "yes", "true", "on", "Y", "YES", "True", "ON", "oN"]
OFF_WORDS = ["0", "n", "no", "false", "off", "N", "NO", "False", "OFF", "oFf"]


@pytest.mark.parametrize("switch", EXTENSION_SWITCHES)
def test_switch_bare_disables(switch: str) -> None:
    assert Cmdline(f"root=/dev/sda1 {switch} quiet").extensions_disabled_by() == switch


@pytest.mark.parametrize("switch", EXTENSION_SWITCHES)
@pytest.mark.parametrize("word", ON_WORDS)
def test_switch_on_words_disable(switch: str, word: str) -> None:
    assert Cmdline(f"quiet {switch}={word}").extensions_disabled_by() == f"{switch}={word}"


@pytest.mark.parametrize("switch", EXTENSION_SWITCHES)
@pytest.mark.parametrize("word", OFF_WORDS)
def test_switch_off_words_do_not_disable(switch: str, word: str) -> None:
    assert Cmdline(f"quiet {switch}={word}").extensions_disabled_by() is None


@pytest.mark.parametrize("switch", EXTENSION_SWITCHES)
def test_switch_last_occurrence_wins(switch: str) -> None:
    assert Cmdline(f"{switch} {switch}=0").extensions_disabled_by() is None
    assert Cmdline(f"{switch}=0 {switch}").extensions_disabled_by() == switch
    assert Cmdline(f"{switch}=off {switch}=on").extensions_disabled_by() == f"{switch}=on"


def test_switch_spelled_with_dashes_is_reported_as_written() -> None:
    assert Cmdline("balena.disable-overlays").extensions_disabled_by() == "balena.disable-overlays"
    assert Cmdline("mobynit.no-overlays=yes").extensions_disabled_by() == "mobynit.no-overlays=yes"
    assert Cmdline("mobynit.no-overlays=no").extensions_disabled_by() is None


def test_switch_with_quoted_value() -> None:
    assert Cmdline('balena.nohostext="yes"').extensions_disabled_by() == "balena.nohostext=yes"
    assert Cmdline('balena.nohostext="off"').extensions_disabled_by() is None
    assert Cmdline('"balena.nohostext"').extensions_disabled_by() == "balena.nohostext"


def test_unrecognised_value_errs_towards_off() -> None:
    assert Cmdline("balena.nohostext=maybe").extensions_disabled_by() == "balena.nohostext=maybe"


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("emergency", "emergency"),
        ("ro quiet emergency", "emergency"),
        ("systemd.unit=emergency.target", "systemd.unit=emergency.target"),
        ('systemd.unit="emergency.target"', "systemd.unit=emergency.target"),
    ],
)
def test_emergency_disables(text: str, token: str) -> None:
    assert Cmdline(text).extensions_disabled_by() == token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "root=/dev/sda2 ro quiet",
        "foo.emergency_x",
        "emergency_x",
        "xemergency",
        "foo.emergency",
        "xbalena.nohostext",
        "balena.nohostextra",
        "balena.nohostext.x",
        "my.balena.disable_overlays",
        "balena.disable_overlays2=1",
        "mobynit.no_overlays_x=1",
        "mobynit.no_overlays_x",
        "x=balena.nohostext",
        "x=emergency",
        "systemd.unit=multi-user.target",
        "systemd.unit=emergency.target.wants",
        "systemd.unit=rescue.target",
        "foo.systemd.unit=emergency.target",
        "systemd-unit=emergency.target",  # "." is not "-": a different parameter
        "systemd.unit=emergency.target systemd.unit=multi-user.target",
        "balena.nohostext=0 balena.disable_overlays=false mobynit.no_overlays=off",
        'x="balena.nohostext emergency"',
        '"x balena.nohostext"',
        "quiet -- balena.nohostext emergency",
    ],
)
def test_not_a_switch(text: str) -> None:
    assert Cmdline(text).extensions_disabled_by() is None


def test_first_applying_switch_is_named() -> None:
    c = Cmdline("mobynit.no_overlays=0 balena.disable_overlays=1 emergency balena.nohostext")
    assert c.extensions_disabled_by() == "balena.disable_overlays=1"


def test_is_true_is_false() -> None:
    assert is_true(None) and not is_false(None)
    for w in ON_WORDS:
        assert is_true(w) and not is_false(w)
    for w in OFF_WORDS:
        assert is_false(w) and not is_true(w)
    assert not is_true("maybe") and not is_false("maybe")
    assert not is_true("") and not is_false("")


# -- properties ------------------------------------------------------------------------

# Names and values a command line can carry without quoting; quoted values add spaces.
SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/:,+@"
names = st.text(SAFE, min_size=1, max_size=12).filter(lambda s: s != "--")
plain_values = st.text(SAFE + "=", max_size=12)
spaced_values = st.text(SAFE + "= \t", max_size=12)


@st.composite
def tokens(draw: st.DrawFn) -> tuple[tuple[str, str | None], str]:
    """A parameter and one way to write it."""
    kind = draw(st.sampled_from(["bare", "plain", "quoted_value", "quoted_whole", "quoted_bare"]))
    name = draw(names)
    if kind == "bare":
        return (name, None), name
    if kind == "plain":
        value = draw(plain_values)
        return (name, value), f"{name}={value}"
    if kind == "quoted_value":
        value = draw(spaced_values)
        return (name, value), f'{name}="{value}"'
    if kind == "quoted_whole":
        # "a b=c": a name with spaces, the quotes around the whole parameter.
        head = draw(st.text(SAFE + " ", min_size=1, max_size=12))
        value = draw(plain_values)
        return (head, value), f'"{head}={value}"'
    head = draw(st.text(SAFE + " ", min_size=1, max_size=12).filter(lambda s: s != "--"))  # "--" ends the list
    return (head, None), f'"{head}"'


separators = st.text(" \t\n", min_size=1, max_size=3)


@PROPS
@given(st.lists(st.tuples(tokens(), separators), max_size=20), st.text(" \t\n", max_size=3))
def test_split_round_trips(items: list[tuple[tuple[tuple[str, str | None], str], str]], lead: str) -> None:
    text = lead + "".join(written + sep for (_, written), sep in items)
    assert split(text) == [param for (param, _), _ in items]


@PROPS
@given(st.lists(tokens(), max_size=15))
def test_split_round_trips_with_single_spaces(items: list[tuple[tuple[str, str | None], str]]) -> None:
    assert split(" ".join(written for _, written in items)) == [param for param, _ in items]


SWITCH_KEYS = {s.replace("-", "_") for s in (*EXTENSION_SWITCHES, "emergency", "systemd.unit")}
switchy = st.sampled_from([*EXTENSION_SWITCHES, "emergency", "balena.disable-overlays", "mobynit.no-overlays"])
switch_tokens = st.tuples(switchy, st.sampled_from([None, *ON_WORDS, *OFF_WORDS, "maybe", ""])).map(
    lambda t: t[0] if t[1] is None else f"{t[0]}={t[1]}"
) | st.sampled_from(["systemd.unit=emergency.target", "systemd.unit=multi-user.target", "systemd.unit=rescue.target"])


@PROPS
@given(
    st.lists(switch_tokens | tokens().map(lambda t: t[1]), max_size=12),
    tokens().filter(lambda t: t[0][0].replace("-", "_") not in SWITCH_KEYS),
    st.integers(min_value=0),
)
def test_non_switch_tokens_never_change_the_verdict(
    base: list[str], extra: tuple[tuple[str, str | None], str], where: int
) -> None:
    before = Cmdline(" ".join(base)).extensions_disabled_by()
    pos = where % (len(base) + 1)
    after = Cmdline(" ".join([*base[:pos], extra[1], *base[pos:]])).extensions_disabled_by()
    assert after == before


@PROPS
@given(st.lists(switch_tokens, min_size=1, max_size=8))
def test_verdict_follows_last_occurrence_of_each_switch(written: list[str]) -> None:
    """Oracle: the first parameter, in command-line order, whose last occurrence says yes."""
    params = [(w.partition("=")[0], w.partition("=")[2] if "=" in w else None) for w in written]
    last: dict[str, tuple[str, str | None]] = {}
    for name, value in params:
        last[name.replace("-", "_")] = (name, value)

    def on(key: str) -> bool:
        name, value = last[key]
        if key == "systemd.unit":
            return value == "emergency.target"
        return value is None or value.lower() not in {"0", "n", "no", "false", "off"}

    expected = None
    for name, _ in params:
        key = name.replace("-", "_")
        if on(key):
            n, v = last[key]
            expected = n if v is None else f"{n}={v}"
            break
    assert Cmdline(" ".join(written)).extensions_disabled_by() == expected


@PROPS
@given(st.lists(tokens(), max_size=15), names)
def test_get_returns_the_last_occurrence(items: list[tuple[tuple[str, str | None], str]], probe: str) -> None:
    c = Cmdline(" ".join(written for _, written in items))
    values = [value for (name, value), _ in items if name.replace("-", "_") == probe.replace("-", "_")]
    assert c.has(probe) == bool(values)
    assert c.get(probe) == (values[-1] if values else None)
