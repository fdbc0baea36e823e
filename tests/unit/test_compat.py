"""Compatibility gates: os-release parsing, systemd-sysext release matching, os-version globs."""

from __future__ import annotations

import fnmatch
import shlex
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mobynit.core import compat
from mobynit.core.labels import OS_VERSION
from mobynit.core.compat import (
    architecture,
    glob_match,
    os_version_verdict,
    parse_os_release,
    sysext_verdict,
)

PROPS = settings(max_examples=300, deadline=None)

HOST = {"ID": "balena-os", "VERSION_ID": "7.0.0", "NAME": "balenaOS"}
ARCH = "x86-64"


# -- os-release parsing ------------------------------------------------------------------


def test_parse_the_standard_forms() -> None:
    text = (
        "# a comment\n"
        "; another\n"
        "\n"
        "NAME=\"Debian GNU/Linux\"\n"
        "ID=debian\n"
        "ID_LIKE='ubuntu fedora'\n"
        "VERSION_ID=\"12\"\n"
        "PRETTY_NAME=\"say \\\"hi\\\" \\\\ \\$HOME \\`x\\` \\q\"\n"
        "BARE=one\\ two\\$\n"
    )
    assert parse_os_release(text) == {
        "NAME": "Debian GNU/Linux",
        "ID": "debian",
        "ID_LIKE": "ubuntu fedora",
        "VERSION_ID": "12",
        "PRETTY_NAME": 'say "hi" \\ $HOME `x` \\q',
        "BARE": "one two$",
    }


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("A=b", {"A": "b"}),
        ("A=", {"A": ""}),
        ('A=""', {"A": ""}),
        ("A=b   ", {"A": "b"}),  # trailing blanks of an unquoted value go
        ("A=  b", {"A": "b"}),  # so do leading ones
        ("A=b c", {"A": "b c"}),  # systemd keeps inner blanks
        ("A='b '", {"A": "b "}),  # quoted blanks stay
        ("A=b\\ ", {"A": "b "}),  # an escaped blank stays
        ("A='x'\"y\"z", {"A": "xyz"}),  # pieces join
        ("A='it'\"'\"'s'", {"A": "it's"}),  # shlex.quote's way with a single quote
        ("A='no \\escape'", {"A": "no \\escape"}),
        ("  A=b", {"A": "b"}),
        ("A =b", {"A": "b"}),
        ("A=b\nA=c", {"A": "c"}),  # the last one wins
        ("A=\"open", {}),  # unterminated: the line is ignored
        ("A='open", {}),
        ("A=\"open\nB=ok", {"B": "ok"}),  # ... and does not swallow the next
        ("A=\"x\\\"", {}),
        ("1A=x", {}),
        ("A-B=x", {}),
        ("A B=x", {}),
        ("=x", {}),
        ("just words", {}),
        ("#A=b", {}),
        ("A=b\x00c", {}),
        ("A=\udcff", {}),  # a byte that was not UTF-8 (surrogateescape)
        ("A=é ü", {"A": "é ü"}),
        ("A=b\r\nC=d\r\n", {"A": "b", "C": "d"}),
        ("A=b # not a comment", {"A": "b # not a comment"}),
        ("A=x\x0cy\x85z\nB=c", {"A": "x\x0cy\x85z", "B": "c"}),  # only \n and \r end a line, as in systemd
        ("A=x\rB=c", {"A": "x", "B": "c"}),
        ("A=trailing\\", {"A": "trailing"}),
    ],
)
def test_parse_lines(line: str, expected: dict[str, str]) -> None:
    assert parse_os_release(line) == expected


_value_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"),
    max_size=30,
)
_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


def _double_quoted(value: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\`$' else c for c in value) + '"'


@PROPS
@given(st.dictionaries(_keys, _value_text, max_size=6), st.sampled_from(["double", "shlex"]))
def test_quoted_values_round_trip(doc: dict[str, str], style: str) -> None:
    quote = _double_quoted if style == "double" else shlex.quote
    text = "".join(f"{k}={quote(v)}\n" for k, v in doc.items())
    assert parse_os_release(text) == doc


@PROPS
@given(st.text(max_size=200))
@example("A='\nB=\"\n")
@example("\\\n'\"")
def test_parse_never_fails_and_gives_clean_pairs(text: str) -> None:
    doc = parse_os_release(text)
    for key, value in doc.items():
        assert key and (key[0].isalpha() or key[0] == "_") and key.isascii()
        assert all(c.isalnum() or c == "_" for c in key)
        assert "\n" not in value and "\x00" not in value
        value.encode("utf-8")


# -- systemd-sysext ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "host", "compatible"),
    [
        ({"ID": "balena-os", "VERSION_ID": "7.0.0"}, HOST, True),
        ({"ID": "balena-os", "VERSION_ID": "6.0.0"}, HOST, False),
        ({"ID": "balena-os"}, HOST, False),  # the host has a version, the extension none
        ({"ID": "debian", "VERSION_ID": "7.0.0"}, HOST, False),
        ({"ID": "_any"}, HOST, True),  # _any skips the version checks
        ({"ID": "_any", "VERSION_ID": "1"}, HOST, True),
        ({"ID": "_any", "ARCHITECTURE": "arm64"}, HOST, False),  # ... but not the architecture
        ({"VERSION_ID": "7.0.0"}, HOST, False),  # no ID
        ({"ID": ""}, HOST, False),
        ({}, HOST, False),  # a release file with nothing in it
        ({"ID": "debian", "VERSION_ID": "7.0.0"}, {**HOST, "ID_LIKE": "ubuntu debian"}, True),
        ({"ID": "deb", "VERSION_ID": "7.0.0"}, {**HOST, "ID_LIKE": "debian"}, False),  # whole words only
        # SYSEXT_LEVEL, when both sides have it, replaces VERSION_ID
        ({"ID": "balena-os", "SYSEXT_LEVEL": "2"}, {**HOST, "SYSEXT_LEVEL": "2"}, True),
        ({"ID": "balena-os", "SYSEXT_LEVEL": "2", "VERSION_ID": "1"}, {**HOST, "SYSEXT_LEVEL": "2"}, True),
        ({"ID": "balena-os", "SYSEXT_LEVEL": "3", "VERSION_ID": "7.0.0"}, {**HOST, "SYSEXT_LEVEL": "2"}, False),
        ({"ID": "balena-os", "SYSEXT_LEVEL": "3", "VERSION_ID": "7.0.0"}, HOST, True),  # host has no level
        ({"ID": "balena-os", "VERSION_ID": "7.0.0"}, {**HOST, "SYSEXT_LEVEL": "2"}, True),  # extension has none
        ({"ID": "balena-os", "VERSION_ID": "6"}, {**HOST, "SYSEXT_LEVEL": "2"}, False),
        # a host with a level but no VERSION_ID, and an extension without a level: accepted, as in systemd
        ({"ID": "balena-os"}, {"ID": "balena-os", "SYSEXT_LEVEL": "2"}, True),
        # a rolling release (no version at all): the ID is enough
        ({"ID": "arch"}, {"ID": "arch"}, True),
        ({"ID": "arch", "VERSION_ID": "1"}, {"ID": "arch", "VERSION_ID": ""}, True),
        # architecture
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "ARCHITECTURE": "x86-64"}, HOST, True),
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "ARCHITECTURE": "_any"}, HOST, True),
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "ARCHITECTURE": ""}, HOST, True),
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "ARCHITECTURE": "x86_64"}, HOST, False),  # uname's spelling
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "ARCHITECTURE": "arm64"}, HOST, False),
        # scope: the root is the system
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "SYSEXT_SCOPE": "system portable"}, HOST, True),
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "SYSEXT_SCOPE": "initrd"}, HOST, False),
        ({"ID": "balena-os", "VERSION_ID": "7.0.0", "SYSEXT_SCOPE": ""}, HOST, False),
        # empty host ID: only _any matches
        ({"ID": "balena-os", "VERSION_ID": "7.0.0"}, {"VERSION_ID": "7.0.0"}, False),
    ],
)
def test_sysext_rules(ext: dict[str, str], host: dict[str, str], compatible: bool) -> None:
    verdict = sysext_verdict("myext", ext, host, ARCH)
    assert (verdict is None) == compatible, verdict
    if verdict is not None:
        assert "\n" not in verdict
        assert "extension-release.myext" in verdict


def test_no_release_file_is_compatible() -> None:
    assert sysext_verdict("x", None, HOST, ARCH) is None
    assert sysext_verdict("x", None, {}, "") is None


def test_reasons_say_what_differs() -> None:
    assert "6.0.0" in sysext_verdict("e", {"ID": "balena-os", "VERSION_ID": "6.0.0"}, HOST, ARCH)
    assert "7.0.0" in sysext_verdict("e", {"ID": "balena-os", "VERSION_ID": "6.0.0"}, HOST, ARCH)
    assert "arm64" in sysext_verdict("e", {"ID": "_any", "ARCHITECTURE": "arm64"}, HOST, ARCH)
    assert "fedora" in sysext_verdict("e", {"ID": "fedora"}, HOST, ARCH)


def test_parsed_release_files_from_the_seeds() -> None:
    """A Kairos-style extension-release: ID and VERSION_ID must both match the host."""
    ext = parse_os_release("ID=kairos\nVERSION_ID=v1.0.0\n")
    host = parse_os_release('NAME="Kairos"\nID=kairos\nVERSION_ID="v1.0.0"\n')
    assert sysext_verdict("kubo", ext, host, ARCH) is None
    assert sysext_verdict("kubo", ext, {**host, "VERSION_ID": "v1.1.0"}, ARCH) is not None


_hostile = st.text(max_size=40)


@PROPS
@given(
    st.text(max_size=20),
    st.dictionaries(st.sampled_from(["ID", "VERSION_ID", "SYSEXT_LEVEL", "ARCHITECTURE", "SYSEXT_SCOPE", "X"]), _hostile),
    st.dictionaries(st.sampled_from(["ID", "ID_LIKE", "VERSION_ID", "SYSEXT_LEVEL"]), _hostile),
    _hostile,
)
def test_sysext_reasons_are_one_printable_line(name: str, ext: dict, host: dict, arch: str) -> None:
    verdict = sysext_verdict(name, ext, host, arch)
    if verdict is not None:
        assert verdict.isprintable(), verdict


@PROPS
@given(
    st.dictionaries(st.sampled_from(["VERSION_ID", "SYSEXT_LEVEL", "ID_LIKE"]), _hostile),
    st.dictionaries(st.sampled_from(["VERSION_ID", "SYSEXT_LEVEL"]), _hostile),
)
def test_any_id_ignores_versions(host: dict, ext: dict) -> None:
    assert sysext_verdict("e", {**ext, "ID": "_any"}, {"ID": "balena-os", **host}, ARCH) is None


@pytest.mark.parametrize(
    ("machine", "name"),
    [
        ("x86_64", "x86-64"),
        ("i686", "x86"),
        ("aarch64", "arm64"),
        ("aarch64_be", "arm64-be"),
        ("armv7l", "arm"),
        ("armv6l", "arm"),
        ("armv5tejl", "arm"),
        ("armv7b", "arm-be"),
        ("ppc64le", "ppc64-le"),
        ("riscv64", "riscv64"),
        ("s390x", "s390x"),
        ("loongarch64", "loongarch64"),
        ("mystery9", "mystery9"),
    ],
)
def test_architecture_names(machine: str, name: str) -> None:
    assert architecture(machine) == name


def test_host_architecture_is_systemds_name() -> None:
    import os

    if os.uname().machine == "x86_64":
        assert compat.host_architecture() == "x86-64"
    assert "_" not in compat.host_architecture() or os.uname().machine not in compat._ARCHITECTURES


# -- io.balena.image.os-version -----------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "version", "compatible"),
    [
        (None, "7.0.0", True),
        (None, None, True),
        ("7.0.0", "7.0.0", True),
        ("7.*", "7.0.0", True),
        ("6.*", "7.0.0", False),
        ("6.*,7.*", "7.0.0", True),
        ("6.*, 7.*", "7.0.0", True),  # blanks around a pattern are ignored
        ("6.*,,", "7.0.0", False),
        ("7.?.0", "7.1.0", True),
        ("7.[0-4].*", "7.3.1", True),
        ("7.[0-4].*", "7.5.1", False),
        ("7.[!0-4].*", "7.5.1", True),
        ("7.0.0", "7.0.0+rev1", False),  # a whole match, not a prefix
        ("*", "anything", True),
        ("V7*", "v7.0", False),  # case-sensitive
        ("", "7.0.0", False),  # names nothing
        (" , ", "7.0.0", False),
        ("7.*", None, False),  # nothing to check against
        ("7.*", "", False),
    ],
)
def test_os_version(label: str | None, version: str | None, compatible: bool) -> None:
    labels = {} if label is None else {OS_VERSION: label, "other": "x"}
    verdict = os_version_verdict(labels, version)
    assert (verdict is None) == compatible, verdict
    if verdict is not None:
        assert OS_VERSION in verdict and "\n" not in verdict


def test_os_version_reason_escapes_the_label() -> None:
    verdict = os_version_verdict({OS_VERSION: "6.*\n\x1b[31mmobynit: all good"}, "7.0.0")
    assert verdict is not None and verdict.isprintable()
    assert "\\x0a" in verdict and "\\x1b" in verdict


# -- the glob matcher against fnmatch ----------------------------------------------------------

_GLOB_ALPHABET = "ab-!]^[*?\\."


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=_GLOB_ALPHABET, max_size=10), st.text(alphabet="ab-!]^[\\.*?", max_size=8))
@example("[!]", "!")
@example("[]a]", "]")
@example("[a-]", "-")
@example("[!b-a]", "c")
@example("[c-a-z]", "-")
@example("[a-c-b-a]", "-")
@example("*a*a*a*b", "aaaaaaaaaaaaaaaaab")
def test_glob_agrees_with_fnmatchcase(pattern: str, text: str) -> None:
    assert glob_match(pattern, text) == fnmatch.fnmatchcase(text, pattern)


@PROPS
@given(st.text(max_size=12), st.text(max_size=12))
def test_glob_agrees_with_fnmatchcase_on_any_text(pattern: str, text: str) -> None:
    assert glob_match(pattern, text) == fnmatch.fnmatchcase(text, pattern)


def test_glob_is_not_exponential() -> None:
    """Backtracking only to the last star: a pathological pattern stays cheap (counted, not timed)."""
    pattern, text = "*a" * 30 + "b", "a" * 200
    calls = 0
    real = compat._one

    def counting(token: object, c: str) -> bool:
        nonlocal calls
        calls += 1
        return real(token, c)

    compat._one = counting  # type: ignore[assignment]
    try:
        assert not glob_match(pattern, text)
    finally:
        compat._one = real  # type: ignore[assignment]
    assert calls <= len(pattern) * len(text) * 2


# -- boot-path cost ------------------------------------------------------------------------------


def test_importing_compat_stays_cheap() -> None:
    code = (
        "import sys; import mobynit.core.compat; "
        "print(' '.join(m for m in ('re', 'fnmatch', 'typing', 'attrs', 'shlex', 'json') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(__import__("pathlib").Path(compat.__file__).parents[2])})
    assert out.stdout.strip() == ""
