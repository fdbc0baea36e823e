"""Layer-facts documents for the fuzzer: its own builder, and which code each kind is written for.

The builder walks a layer itself (not with mobynit.core.facts.walk) and writes
the current format (FACTS_VERSION, imported, and the layer's id) unless a kind
targets that gate; test_facts_kinds.py holds facts.load to the tables below.
"""

from __future__ import annotations

import json
import os
import stat

from mobynit.core.facts import FACTS_VERSION

HOSTAPP_FILE = "usr/share/hostapp/only-in-hostapp"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# Which code each kind of facts document is written for, and whether facts.load must accept it
# (hand-written: the oracle test_facts_kinds.py holds mobynit to). Lists: the version/id gate,
# the parser's nesting guard, the list validators; the truthful kinds are accepted.
FACTS_LISTS_TARGET = {
    "true": ("accepted", True),
    "unlisted": ("accepted", True),  # paths null: a layer too big to list
    "nothing": ("accepted", True),  # a lie, but well-formed: only ctimes can tell
    "hostile": ("validator", None),  # accepted exactly when `text` is a relative path
    "types": ("validator", False),
    "deep": ("parser", False),
    "old-version": ("gate", False),
    "other-id": ("gate", False),
}
# Dirs: the staleness check (load) and the trust of unchecked facts (flat_conflict).
FACTS_DIRS_TARGET = {
    "correct": ("staleness", True),
    "none": ("trust", True),  # loads; flat_conflict trusts it for the hostapp only
    "stale": ("staleness", False),
    "missing-dir": ("staleness", False),
    "malformed": ("dirs validator", False),
}
FACTS_LISTS = tuple(FACTS_LISTS_TARGET)
FACTS_DIRS = tuple(FACTS_DIRS_TARGET)
LIES = ("nothing", "hostile")  # lists that may not be the layer's truth



def layer_truth(diff: str) -> dict[str, list]:
    """What a layer directory holds, walked without following symlinks: whiteouts (0/0
    character devices), opaque directories, every path, and [path, ctime_ns] of "." and
    every directory (the format of docs/fuzzing.md's facts section)."""
    whiteouts: list[str] = []
    opaques: list[str] = []
    paths: list[str] = []
    dirs: list[list] = []
    for dirpath, dirnames, filenames in os.walk(diff):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, diff)
            st_ = os.lstat(path)
            paths.append(rel)
            if stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0:
                whiteouts.append(rel)
            elif stat.S_ISDIR(st_.st_mode):
                dirs.append([rel, st_.st_ctime_ns])
                try:
                    if os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                        opaques.append(rel)
                except OSError:
                    pass
    return {"whiteouts": sorted(whiteouts), "opaques": sorted(opaques), "paths": sorted(paths),
            "dirs": [[".", os.lstat(diff).st_ctime_ns], *sorted(dirs)]}  # "." first


def _relative(text: object) -> bool:
    """A relative path inside a layer: no NUL, not absolute, no empty, `.` or `..` component."""
    return (isinstance(text, str) and bool(text) and "\0" not in text and not text.startswith("/")
            and all(part not in ("", ".", "..") for part in text.split("/")))


def facts_accepted(lists: str, dirs: str, text: str) -> bool:
    """Whether facts.load must accept the document facts_text builds for these parameters."""
    ok = FACTS_LISTS_TARGET[lists][1]
    if ok is None:
        ok = _relative(text)
    return ok and FACTS_DIRS_TARGET[dirs][1]


def facts_text(diff: str, layer_id: str, lists: str, dirs: str, text: str) -> bytes:
    """A facts document for the layer at `diff` (overlay2/<layer_id>/diff), current format
    (FACTS_VERSION, this layer's id) unless `lists` targets that gate ("old-version", "other-id")."""
    truth = layer_truth(diff)
    ctimes: object = {
        "correct": truth["dirs"],
        "none": None,
        "stale": [[".", truth["dirs"][0][1] - 1_000_000_000], *truth["dirs"][1:]],  # a second earlier
        "missing-dir": [*truth["dirs"], ["no-such-directory", truth["dirs"][0][1]]],
        "malformed": [["..", truth["dirs"][0][1]], *truth["dirs"][1:]],
    }[dirs]
    body: dict[str, object] = {"whiteouts": truth["whiteouts"], "opaques": truth["opaques"], "xattrs": [],
                               "paths": truth["paths"]}
    if lists == "unlisted":  # as for a layer too big to list
        body["paths"] = None
    elif lists == "nothing":
        body = {"whiteouts": [], "opaques": [], "xattrs": [], "paths": []}
    elif lists == "hostile":
        body = {"whiteouts": [text, HOSTAPP_FILE], "opaques": [text], "xattrs": [],
                "paths": [text, "usr", "usr/share", "usr/share/hostapp"]}
    elif lists == "types":
        body = {"whiteouts": text, "opaques": {text: 1}, "xattrs": None, "paths": 7}
    version = FACTS_VERSION - 1 if lists == "old-version" else FACTS_VERSION
    lid = layer_id[::-1] if lists == "other-id" else layer_id
    doc = json.dumps({"version": version, "id": lid, **body, "dirs": ctimes})
    if lists == "deep":
        doc = doc[:-1] + f', "x": {_deep(100000)}}}'
    return doc.encode("utf-8", "surrogatepass")
