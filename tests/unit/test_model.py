"""The frozen records of the data model, and how store values are shown safely."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.builders import container, extension, hostapp
from mobynit.core.errors import shown
from mobynit.core.model import Container, Decision, KernelModules, Layer, Record

PROPS = settings(max_examples=200, deadline=None)


def test_fields_by_position_and_keyword() -> None:
    a = KernelModules("6.1.0", "ab")
    b = KernelModules(release="6.1.0", symvers_sha256="ab")
    c = KernelModules("6.1.0", symvers_sha256="ab")
    assert a == b == c
    assert a.release == "6.1.0" and a.symvers_sha256 == "ab"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("6.1.0",), {}),  # missing field
        (("6.1.0", "ab", "extra"), {}),  # too many
        (("6.1.0",), {"release": "x", "symvers_sha256": None}),  # repeated
        ((), {"release": "x", "symvers_sha256": None, "bogus": 1}),  # unknown
    ],
)
def test_bad_construction_raises_type_error(args: tuple, kwargs: dict) -> None:
    with pytest.raises(TypeError):
        KernelModules(*args, **kwargs)


def test_records_are_frozen() -> None:
    layer = Layer(id="a" * 64, path="/x/diff", link="l/ABC")
    with pytest.raises(AttributeError):
        layer.path = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del layer.path
    with pytest.raises(AttributeError):
        layer.new_field = 1  # type: ignore[attr-defined]
    assert layer.path == "/x/diff"


def test_equality_and_hash_by_value() -> None:
    a = container("c", labels={"k": "v", "a": "b"})
    b = container("c", labels={"a": "b", "k": "v"})
    assert a == b and hash(a) == hash(b)
    assert a is not b
    assert len({a, b}) == 1
    assert a != container("c", labels={"k": "other", "a": "b"})
    assert a != container("d")


def test_equality_needs_the_same_type() -> None:
    class Other(Record):
        __slots__ = ("release", "symvers_sha256")

    assert KernelModules("r", None) != Other("r", None)
    assert KernelModules("r", None) != ("r", None)


def test_nested_records_compare_deeply() -> None:
    assert extension("e", nlayers=3) == extension("e", nlayers=3)
    assert extension("e", nlayers=3) != extension("e", nlayers=2)
    assert hash(extension("e", override=4)) == hash(extension("e", override=4))


def test_replace_gives_a_new_record() -> None:
    ext = extension("e")
    d = Decision(extension=ext, included=True, position="normal", priority=None, reason=None, warning=None)
    dropped = d.replace(included=False, reason="why")
    assert d.included and d.reason is None  # the original is unchanged
    assert dropped.included is False and dropped.reason == "why"
    assert dropped.extension is ext
    assert d.drop("why") == dropped
    with pytest.raises(TypeError):
        d.replace(nonsense=1)


def test_repr_shows_every_field() -> None:
    m = KernelModules(release="6.1.0", symvers_sha256=None)
    assert repr(m) == "KernelModules(release='6.1.0', symvers_sha256=None)"
    assert repr(hostapp()).startswith("Container(id='")


@PROPS
@given(st.text(max_size=20), st.one_of(st.none(), st.text(max_size=20)), st.text(max_size=20))
def test_replace_then_compare(release: str, digest: str | None, other: str) -> None:
    m = KernelModules(release=release, symvers_sha256=digest)
    assert m.replace() == m and hash(m.replace()) == hash(m)
    changed = m.replace(release=other)
    assert (changed == m) == (other == release)
    assert eval(repr(m), {"KernelModules": KernelModules}) == m


def test_container_fields() -> None:
    assert set(Container.__slots__) == {"id", "name", "labels", "state", "layers", "overlay2", "config"}


# -- errors.shown ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("a\nb", "a\\x0ab"),
        ("\x1b[2J", "\\x1b[2J"),
        ("tab\there", "tab\\x09here"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("nel\x85", "nel\\x85"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("rlo\u202eevil", "rlo\\u202eevil"),
        ("surrogate\udcff", "surrogate\\udcff"),
        ("tag\U000e0001", "tag\\U000e0001"),
        ("unicode é ✓", "unicode é ✓"),
        (42, "42"),
    ],
)
def test_shown_escapes_control_characters(value: object, expected: str) -> None:
    assert shown(value) == expected


def test_shown_caps_length() -> None:
    assert shown("x" * 100, 10) == "x" * 10 + "..."
    assert shown("x" * 10, 10) == "x" * 10
    assert len(shown("y" * 10_000)) == 83


@PROPS
@given(st.text(), st.integers(1, 200))
def test_shown_is_printable_and_bounded(value: str, limit: int) -> None:
    out = shown(value, limit)
    assert out.isprintable()
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    # At most `limit` characters of the value, each escaped to at most 10 ("\U" + 8 hex digits).
    assert len(out) <= 10 * limit + 3
    if value.isprintable():
        assert out == (value if len(value) <= limit else value[:limit] + "...")


class _WithDefault(Record):
    __slots__ = ("a", "b", "c")
    _defaults = {"c": "default"}


def test_defaulted_field_by_position_or_keyword_or_left_out() -> None:
    assert _WithDefault(1, 2).c == "default"
    assert _WithDefault(a=1, b=2).c == "default"
    assert _WithDefault(1, 2, c=3).c == 3
    assert _WithDefault(1, 2, 3).c == 3
    assert _WithDefault(1, 2, 3) == _WithDefault(a=1, b=2, c=3)
    with pytest.raises(TypeError):
        _WithDefault(1)  # b has no default
    with pytest.raises(TypeError):
        _WithDefault(1, 2, 3, c=4)


def test_jsonio_matches_json_without_importing_it() -> None:
    """The boot path's JSON reader agrees with json, including its errors, in a fresh interpreter."""
    import subprocess
    import sys

    code = r'''
import sys
from mobynit.core import jsonio
assert "json" not in sys.modules and "re" not in sys.modules, sorted(m for m in ("json", "re") if m in sys.modules)
assert jsonio.loads(b'{"a": [1, 2.5, "\\u00e9", null, true]}') == {"a": [1, 2.5, "\u00e9", None, True]}
assert jsonio.dumps({"a": [1, "\u00e9", None]}) == '{"a":[1,"\\u00e9",null]}'
for bad in ('{', '{"a": 1} x', '', '[1,]', '{"a" 1}', b'\xff', '\ufeff{}'):
    try:
        jsonio.loads(bad)
    except ValueError:
        continue
    raise AssertionError(f"accepted {bad!r}")
print("ok")
'''
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2])})
    assert out.stdout == "ok\n", out.stderr
