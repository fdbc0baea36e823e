"""Which extensions a live merge may take (docs/live.md): the data store's
container extensions, each with its verdict. A container extension can go
live only when merging it now means what it will mean at the next boot:
not requires-reboot, not already booted, every file under a merged
hierarchy, no deletions, and (unless an override) no file of the booted
root replaced. sysext images are found by mobynit.core.sysext.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence

import attrs

from mobynit.core import labels as label
from mobynit.core import policy, sysext
from mobynit.core.errors import MobynitError, StoreError, shown
from mobynit.tools.live_state import LiveError, Settings

CONTAINER = "container"


@attrs.frozen
class Candidate:
    """An extension that may be merged: where its tree is (after `open`), and its verdict so far."""

    name: str
    kind: str
    source: str
    fault: str | None = None
    layers: tuple[str, ...] = ()  # a container's layer directories, top first
    override: bool = False
    priority: tuple[int, int, str] = (0, 0, "")


def container_candidates(s: Settings, base_has: Callable[[str], bool]) -> list[Candidate]:
    """The data store's extension containers, each with a verdict: can it go live?"""
    if not s.data_store or not os.path.isdir(s.data_store):
        return []
    from mobynit.core.cmdline import Cmdline
    from mobynit.core.store import Store

    try:
        found = Store(s.data_store).scan(label.is_extension, s.kernel_release)
    except (StoreError, OSError) as e:
        raise LiveError(f"extension store {s.data_store} unreadable: {e}") from None
    booted = _booted_ids(s.boot_record)
    cmdline = Cmdline(s.cmdline)
    host = policy.Host(os_release=sysext.host_release(s.root), architecture=host_arch(),
                       strict_os_version=cmdline.flag(policy.CMDLINE_STRICT_OS_VERSION))
    out = []
    for ext in found:
        d = policy.decide(ext, s.kernel_release, cmdline.get(policy.CMDLINE_ABI), host)
        layers = tuple(layer.path for layer in ext.container.layers) if ext.container else ()
        rank = policy.order_key(d)
        fault = d.reason or live_verdict(ext.container.labels if ext.container else {}, layers, s.hierarchies,
                                         d.position == "override", base_has, ext.id in booted)
        out.append(Candidate(name=ext.name, kind=CONTAINER, source=ext.id, fault=fault, layers=layers,
                             override=d.position == "override", priority=(rank[1], rank[2], rank[3])))
    return out


def host_arch() -> str:
    from mobynit.core.compat import host_architecture

    return host_architecture()


def _booted_ids(path: str | None) -> set[str]:
    if not path:
        return set()
    from mobynit.core.record import BootRecord

    try:
        return {e.id for e in BootRecord.read(path).included}
    except MobynitError:
        return set()


def live_verdict(labels: dict[str, str] | object, layers: Sequence[str], hierarchies: Sequence[str], override: bool,
                 base_has: Callable[[str], bool], booted: bool) -> str | None:
    """Why a container extension must wait for the next boot, or None if it can go live.

    It can when: its image does not say requires-reboot=true; it is not
    already in the booted root; every file it ships lies under a merged
    hierarchy and none is a whiteout or opaque directory (deletions only
    mean what they mean at boot, inside the root's own stack); and, unless it
    is an override, it replaces no file of the booted root (a normal
    extension sits below the hostapp at boot: it may only add files).
    """
    value = str(labels.get(label.REQUIRES_REBOOT, "")).strip().lower() if isinstance(labels, dict) else ""
    if value in ("1", "true", "yes", "on"):
        return f"{label.REQUIRES_REBOOT}={value}: waits for the next boot"
    if booted:
        return "already in the booted root"
    prefixes = tuple(h.strip("/") + "/" for h in hierarchies)
    ancestors = {p for h in hierarchies for p in _ancestors(h.strip("/"))}
    for layer in layers:
        for rel, st in _walk(layer):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return f"deletes /{shown(rel, 120)} (a whiteout): waits for the next boot"
            if stat.S_ISDIR(st.st_mode):
                if _opaque(os.path.join(layer, rel)):
                    return f"/{shown(rel, 120)} is an opaque directory: waits for the next boot"
                continue
            if not rel.startswith(prefixes) or rel in ancestors:
                return f"ships /{shown(rel, 120)}, outside {', '.join(hierarchies)}: waits for the next boot"
            if not override and base_has(rel):
                return f"would replace /{shown(rel, 120)} of the booted root (only overrides may): waits for the next boot"
    return None


def _ancestors(h: str) -> list[str]:
    parts = h.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _walk(top: str) -> list[tuple[str, os.stat_result]]:
    out: list[tuple[str, os.stat_result]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            names = os.listdir(os.path.join(top, rel) if rel else top)
        except OSError:
            continue
        for name in names:
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(os.path.join(top, r))
            except OSError:
                continue
            out.append((r, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)
    return out


def _opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False
