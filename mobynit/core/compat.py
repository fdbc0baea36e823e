"""Does an extension suit this hostapp's OS? Pure functions over text and labels.

Two gates, both borrowed from elsewhere so that images built for those tools
mean the same thing here:

- systemd-sysext's release matching: an extension that carries
  `usr/lib/extension-release.d/extension-release.<name>` names the OS it was
  built for (`ID`, `SYSEXT_LEVEL` or `VERSION_ID`, `ARCHITECTURE`), and is
  refused on any other, as systemd refuses it (src/shared/extension-util.c);
- balena's `io.balena.image.os-version` label: comma-separated shell globs
  matched against the hostapp's os-release `VERSION_ID`.

Nothing here reads the disk, and nothing here imports `re`, `fnmatch` or
`typing`: this runs at every boot, for every extension.
"""

from __future__ import annotations

from mobynit.core import labels as label
from mobynit.core.errors import shown

TYPE_CHECKING = False  # `import typing` costs ~10 ms at boot
if TYPE_CHECKING:
    from collections.abc import Mapping

RELEASE_DIR = "usr/lib/extension-release.d"
ANY = "_any"
SCOPE = "system"  # the root mobynit assembles is the system, not a portable service or the initrd

_KEY_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_KEY_CHARS = _KEY_START | frozenset("0123456789")
_SHELL_ESCAPED = frozenset('"\\`$')  # what a backslash escapes inside double quotes
_BLANK = " \t"


# --- os-release(5) ----------------------------------------------------------------


def parse_os_release(text: str) -> dict[str, str]:
    """The KEY=value assignments of an os-release or extension-release file.

    Shell-style, as os-release(5) prescribes and systemd parses it: `#` and `;`
    start comment lines; values may be unquoted (a backslash escapes any
    character, trailing blanks are dropped), in single quotes (taken
    literally) or in double quotes (a backslash escapes only `"`, `\\`, `` ` ``
    and `$`, and is kept before anything else); quoted and unquoted pieces
    join up. The last assignment of a key wins. Unlike systemd, a value never
    continues onto the next line: a line with an unterminated quote, a key
    that is not a shell name, or an undecodable character (a surrogate, from
    bytes decoded with surrogateescape) or NUL is ignored, so one torn line
    cannot swallow the keys after it.
    """
    result: dict[str, str] = {}
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):  # systemd's newlines only
        parsed = _assignment(line)
        if parsed is not None:
            result[parsed[0]] = parsed[1]
    return result


def _assignment(line: str) -> tuple[str, str] | None:
    line = line.lstrip(_BLANK)
    if not line or line[0] in "#;":
        return None
    key, eq, rest = line.partition("=")
    key = key.rstrip(_BLANK)
    if not eq or not key or key[0] not in _KEY_START or not _KEY_CHARS.issuperset(key):
        return None
    value = _value(rest)
    if value is None or "\x00" in value or not _encodable(value):
        return None
    return key, value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
        return False
    return True


def _value(raw: str) -> str | None:
    """The shell word after `=`, or None if a quote is left open."""
    out: list[str] = []
    i, n = 0, len(raw)
    trail = -1  # where a run of trailing unquoted blanks starts in `out`, if one is open
    while i < n and raw[i] in _BLANK:
        i += 1
    while i < n:
        c = raw[i]
        if c == "'":
            end = raw.find("'", i + 1)
            if end < 0:
                return None
            out.append(raw[i + 1 : end])
            i = end + 1
            trail = -1
            while i < n and raw[i] in _BLANK:  # systemd: blanks after a closing quote vanish
                i += 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    return None
                c = raw[i]
                if c == '"':
                    break
                if c == "\\" and i + 1 < n:
                    nxt = raw[i + 1]
                    out.append(nxt if nxt in _SHELL_ESCAPED else "\\" + nxt)
                    i += 2
                    continue
                out.append(c)
                i += 1
            i += 1
            trail = -1
            while i < n and raw[i] in _BLANK:
                i += 1
        elif c == "\\":
            if i + 1 < n:
                out.append(raw[i + 1])
            i += 2
            trail = -1
        else:
            if c in _BLANK:
                if trail < 0:
                    trail = len(out)
            else:
                trail = -1
            out.append(c)
            i += 1
    if trail >= 0:
        del out[trail:]
    return "".join(out)


# --- systemd-sysext ---------------------------------------------------------------

# uname(2) machine -> systemd's architecture name (src/basic/architecture.c).
_ARCHITECTURES = {
    "x86_64": "x86-64",
    "i686": "x86",
    "i586": "x86",
    "i486": "x86",
    "i386": "x86",
    "x32": "x32",
    "aarch64": "arm64",
    "aarch64_be": "arm64-be",
    "alpha": "alpha",
    "arc": "arc",
    "arceb": "arc-be",
    "crisv32": "cris",
    "ia64": "ia64",
    "parisc64": "parisc64",
    "parisc": "parisc",
    "loongarch64": "loongarch64",
    "m68k": "m68k",
    "mips64": "mips64",
    "mips": "mips",
    "nios2": "nios2",
    "ppc64le": "ppc64-le",
    "ppc64": "ppc64",
    "ppcle": "ppc-le",
    "ppc": "ppc",
    "riscv64": "riscv64",
    "riscv32": "riscv32",
    "s390x": "s390x",
    "s390": "s390",
    "sh5": "sh64",
    "sh4a": "sh",
    "sh4": "sh",
    "sh3": "sh",
    "sh2a": "sh",
    "sh2": "sh",
    "sparc64": "sparc64",
    "sparc": "sparc",
    "tilegx": "tilegx",
}


def architecture(machine: str) -> str:
    """systemd's name for a `uname -m` machine (`x86_64` -> `x86-64`, `armv7l` -> `arm`).

    An unknown machine is returned as it is: an extension then matches it only
    by naming it exactly, or with `_any`.
    """
    known = _ARCHITECTURES.get(machine)
    if known is not None:
        return known
    if machine.startswith("armv") and machine[-1:] in ("l", "b"):
        return "arm" if machine.endswith("l") else "arm-be"
    if machine == "riscv":
        import sys

        return "riscv64" if sys.maxsize > 2**32 else "riscv32"
    return machine


def host_architecture() -> str:
    """The running machine's architecture, in systemd's naming."""
    import posix

    return architecture(posix.uname().machine)


def sysext_verdict(
    ext_name: str, ext_release: Mapping[str, str] | None, host_release: Mapping[str, str], host_arch: str
) -> str | None:
    """Why the extension's release file refuses this host, or None if it accepts it.

    `ext_release` is the parsed `extension-release.<ext_name>` (None when the
    extension has none: then only the balena rules apply); `host_release` the
    hostapp's os-release; `host_arch` in systemd's naming (see `architecture`).
    The rules, in systemd's order: SYSEXT_SCOPE, when set, includes
    `system`; ARCHITECTURE, when set and not `_any`, names the host's; ID is set,
    and is `_any` (which skips the version checks) or the host's ID or one of
    its ID_LIKE; then, unless the host declares no version at all (a rolling
    release), SYSEXT_LEVEL must be equal when both sides set it, otherwise
    VERSION_ID must be set and equal. Empty values count as unset.
    """
    if ext_release is None:
        return None
    what = f"extension-release.{shown(ext_name, 60)}"
    if not ext_release:
        return f"{what} holds no release data"
    scope = ext_release.get("SYSEXT_SCOPE")
    if scope is not None and SCOPE not in scope.split():
        return f"{what}: SYSEXT_SCOPE={shown(scope, 40)} does not include {SCOPE}"
    arch = ext_release.get("ARCHITECTURE") or ""
    if arch and arch != ANY and arch != host_arch:
        return f"{what}: built for architecture {shown(arch, 40)}, this machine is {shown(host_arch, 40)}"
    ext_id = ext_release.get("ID") or ""
    if not ext_id:
        return f"{what} has no ID (set it to the OS's ID, or {ANY})"
    if ext_id == ANY:
        return None
    host_id = host_release.get("ID") or ""
    like = (host_release.get("ID_LIKE") or "").split()
    if ext_id != host_id and ext_id not in like:
        also = f" (like {shown(' '.join(like), 60)})" if like else ""
        return f"{what}: built for OS {shown(ext_id, 40)}, the hostapp is {shown(host_id or '(no ID)', 40)}{also}"
    host_version = host_release.get("VERSION_ID") or ""
    host_level = host_release.get("SYSEXT_LEVEL") or ""
    if not host_version and not host_level:
        return None  # a rolling release: the ID is all there is to match
    ext_level = ext_release.get("SYSEXT_LEVEL") or ""
    if host_level and ext_level:
        if ext_level != host_level:
            return f"{what}: SYSEXT_LEVEL={shown(ext_level, 40)}, the hostapp's is {shown(host_level, 40)}"
        return None
    if host_version:
        ext_version = ext_release.get("VERSION_ID") or ""
        if not ext_version:
            return f"{what} has neither a matching SYSEXT_LEVEL nor a VERSION_ID (the hostapp is {shown(host_version, 40)})"
        if ext_version != host_version:
            return f"{what}: built for VERSION_ID={shown(ext_version, 40)}, the hostapp is {shown(host_version, 40)}"
    return None


# --- io.balena.image.os-version -----------------------------------------------------


def os_version_verdict(labels: Mapping[str, str], version_id: str | None) -> str | None:
    """Why the os-version label refuses this hostapp's VERSION_ID, or None.

    The label is comma-separated shell globs (fnmatch, case-sensitive; blanks
    around each are ignored); one matching is enough. No label: no constraint.
    A label that names no pattern, or a hostapp without a VERSION_ID, fails:
    a constraint that cannot be checked is not met.
    """
    value = labels.get(label.OS_VERSION)
    if value is None:
        return None
    patterns = [p.strip(_BLANK) for p in value.split(",")]
    patterns = [p for p in patterns if p]
    said = f"{label.OS_VERSION}={shown(value, 60)}"
    if not patterns:
        return f"{said} names no OS version"
    if not version_id:
        return f"{said}, but the hostapp's os-release has no VERSION_ID to check it against"
    for pattern in patterns:
        if glob_match(pattern, version_id):
            return None
    return f"{said} does not match the hostapp's VERSION_ID {shown(version_id, 40)}"


# --- shell globs, as fnmatch.fnmatchcase ------------------------------------------

_STAR = object()  # any run of characters
_ONE = object()  # any one character


def _compile(pattern: str) -> list[object]:
    """Tokens: a character, _STAR, _ONE, or (negated, ranges) for a bracket class.

    Bracket rules are fnmatch's: `!` first negates, a `]` first is a member,
    `a-z` is a range (an inverted one matches nothing, a `-` first or last is
    itself), a backslash is an ordinary character, and a `[` without its `]`
    is a literal `[`.
    """
    tokens: list[object] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not tokens or tokens[-1] is not _STAR:
                tokens.append(_STAR)
        elif c == "?":
            tokens.append(_ONE)
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                tokens.append("[")
                continue
            body = pattern[i:j]
            negated = body[:1] == "!"
            if negated:
                body = body[1:]
            ranges = []
            k, m = 0, len(body)
            while k < m:
                if k + 2 < m and body[k + 1] == "-":
                    ranges.append((body[k], body[k + 2]))
                    k += 3
                else:
                    ranges.append((body[k], body[k]))
                    k += 1
            tokens.append((negated, tuple(ranges)))
            i = j + 1
        else:
            tokens.append(c)
    return tokens


def _one(token: object, c: str) -> bool:
    if token is _ONE:
        return True
    if isinstance(token, tuple):
        negated, ranges = token
        inside = any(lo <= c <= hi for lo, hi in ranges)
        return inside != negated
    return token == c


def glob_match(pattern: str, text: str) -> bool:
    """fnmatch.fnmatchcase(text, pattern), without compiling a regular expression.

    Greedy matching with backtracking to the last `*` only: enough for
    patterns whose other tokens each match exactly one character, and linear
    in memory.
    """
    tokens = _compile(pattern)
    t = s = 0
    star_t = -1
    star_s = 0
    nt, ns = len(tokens), len(text)
    while s < ns:
        if t < nt and tokens[t] is _STAR:
            star_t, star_s = t, s
            t += 1
        elif t < nt and _one(tokens[t], text[s]):
            t += 1
            s += 1
        elif star_t >= 0:
            t = star_t + 1
            star_s += 1
            s = star_s
        else:
            return False
    while t < nt and tokens[t] is _STAR:
        t += 1
    return t == nt
