"""The one way decisions are put into words: the boot console, `plan` and `status`.

All three show a BootRecord (a plan is shown as the record it would leave),
so an extension reads the same wherever a person meets it:

    extension NAME: included, override 5
    extension NAME: skipped: REASON
    extension NAME: warning: WARNING

Live layering (`mobynit merge`, `list`, `status`) words its extensions here too:

    live sysext squashfs NAME: merged into /usr
    live container extension NAME: not merged: REASON

Everything that came from a store passes through `shown()` first.
"""

from __future__ import annotations

from mobynit.core.errors import shown
from mobynit.core.model import OVERRIDE, SYSEXT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mobynit.core.record import BootRecord, Entry, LiveEntry, LiveRecord


def position(entry: Entry) -> str:
    """`override 5`, `override (unranked)`, `sysext image` or `normal`."""
    if entry.position == SYSEXT:
        return "sysext image"
    if entry.position != OVERRIDE:
        return "normal"
    return f"override {entry.priority}" if entry.priority is not None else "override (unranked)"


def decision(entry: Entry) -> list[str]:
    name = shown(entry.name)
    lines = [f"extension {name}: warning: {entry.warning}"] if entry.warning else []
    if entry.included:
        lines.append(f"extension {name}: included, {position(entry)}")
    else:
        lines.append(f"extension {name}: skipped: {entry.reason}")
    return lines


def layout(rec: BootRecord) -> str | None:
    """How the root is built, when it holds extensions: `layout flat (fsconfig), stacking depth 1`."""
    if not rec.included:
        return None
    how = f"layout {rec.layout} ({rec.mechanism}), stacking depth {rec.stacking_depth}"
    return f"{how}: {rec.layout_reason}" if rec.layout_reason else how


def selection(rec: BootRecord) -> list[str]:
    """The hostapp, whether extensions were read, each decision, and the layout."""
    h = rec.hostapp
    lines = [f"hostapp {shown(h.name)} ({h.id[:12]}): {len(h.layers)} layers"]
    if rec.disabled_reason:
        lines.append(rec.disabled_reason)
    else:
        lines.append(f"extensions: {len(rec.extensions)} found, {len(rec.included)} included")
    for entry in rec.extensions:
        lines += decision(entry)
    how = layout(rec)
    if how is not None:
        lines.append(how)
    return lines


def mounted(rec: BootRecord) -> str:
    n = len(rec.included)
    return f"root mounted read-only at {rec.target}: hostapp and {n} extension{'s' if n != 1 else ''}"


def live_entry(e: LiveEntry, would: bool = False) -> list[str]:
    """One live extension: merged (or would be), or why not."""
    what = "container extension" if e.kind == "container" else f"sysext {e.kind}"
    lines = [f"live {what} {shown(e.name)}: warning: {e.warning}"] if e.warning else []
    if e.merged:
        verb = "would merge" if would else "merged"
        lines.append(f"live {what} {shown(e.name)}: {verb} into {', '.join(e.hierarchies)}")
    else:
        lines.append(f"live {what} {shown(e.name)}: {'not merged' if not would else 'skipped'}: {e.reason}")
    return lines


def live(rec: LiveRecord | None, note: str | None = None, would: bool = False) -> list[str]:
    """What is merged live, from where, and why anything was refused; `would`: what a merge would do."""
    out: list[str] = []
    if note:
        out.append(f"live: {note}")
    if rec is None:
        out.append("live: nothing merged since boot")
        return out
    if not would:
        where = ", ".join(rec.hierarchies) or "nothing"
        out.append(f"live: {rec.state}, generation {rec.generation}: {where} overlaid ({rec.mechanism})")
    for e in rec.extensions:
        out += live_entry(e, would)
    return out
