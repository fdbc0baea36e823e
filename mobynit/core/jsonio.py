"""JSON in and out for the boot path, without importing the json package.

`import json` pulls in `re` (and with it enum and the regex compiler): about
10 ms of the 35 ms a whole `mobynit assemble` may take. The json package's
speed comes from its C accelerator `_json` anyway; this module drives the
same scanner and encoder directly, with the json package's own settings
(strict strings, NaN/Infinity accepted on input, compact output). Anything
off the boot path may keep using `json`.
"""

from __future__ import annotations

import _json

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """The attributes _json.make_scanner reads from a json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict[object, object] = {}


_scan = _json.make_scanner(_Context())


def _default(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_encode = _json.make_encoder(None, _default, _json.encode_basestring_ascii, None, ":", ",", False, False, True)


def loads(text: str | bytes) -> object:
    """Like json.loads; raises ValueError (never anything else for bad input but RecursionError)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    i, n = 0, len(text)
    if text.startswith("\ufeff"):
        raise ValueError("unexpected UTF-8 BOM")
    while i < n and text[i] in _WHITESPACE:
        i += 1
    try:
        value, end = _scan(text, i)
    except StopIteration as e:
        raise ValueError(f"expecting a value at character {e.value}") from None
    except SystemError:
        # The C scanner describes a syntax error with json.decoder.JSONDecodeError,
        # which it finds only if json was imported: on this rare path, let json say it.
        import json

        return json.loads(text)
    finally:
        _Context.memo.clear()
    while end < n and text[end] in _WHITESPACE:
        end += 1
    if end != n:
        raise ValueError(f"extra data at character {end}")
    return value


def dumps(obj: object) -> str:
    """Compact JSON, ASCII-only (non-ASCII characters escaped), as json.dumps(separators=(",", ":"))."""
    return "".join(_encode(obj, 0))
