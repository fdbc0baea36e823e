"""`mobynit status`: how this system was booted, read back from the boot record.

The record is read and checked by the class that wrote it
(mobynit.core.record.BootRecord) and its decisions are worded by the same
renderer the boot console used (mobynit.core.render), so status says what
boot said.
"""

from __future__ import annotations

import json
import sys

from mobynit.core import render
from mobynit.core.errors import MobynitError, shown
from mobynit.core.options import Args
from mobynit.core.paths import ACTIVE_SYSROOT
from mobynit.core.record import BootRecord

def describe(rec: BootRecord) -> str:
    """The boot record for people: what was booted, what was left out and why."""
    boot = rec.boot
    out = []
    if boot is not None and boot.root is not None:
        out.append(f"root partition: {boot.root.spec} ({boot.root.device}), at {ACTIVE_SYSROOT}")
        out += [f"  ignored {shown(p)}: named like it, not on its disk" for p in boot.root.ignored]
    if boot is not None and boot.data is not None:
        where = boot.data.device or f"not mounted: {boot.data.reason}"
        out.append(f"data partition: {boot.data.spec} ({where})")
        out += [f"  ignored {shown(p)}: carries its name, not on the root partition's disk" for p in boot.data.ignored]
    out += render.selection(rec)
    if rec.attempts is not None:
        counted = rec.attempts
        state = "hostapp alone" if counted.fallback else "counting"
        out.append(f"boot attempts: {counted.unconfirmed} unconfirmed of mobynit.max_tries={counted.max_tries}"
                   f" ({state}); `mobynit confirm` resets them")
    out += [f"fallback: {shown(f, 300)}" for f in rec.fallbacks]
    if boot is not None:
        start = boot.init_start or boot.python_start
        out.append(f"init: {boot.init}, handed over at {boot.handover} s ({boot.handover - start:.2f} s in the initramfs)")
        if boot.phases:
            out.append("phases: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in boot.phases.items()))
    return "\n".join(out) + "\n"


def live_lines(live_record: str) -> tuple[list[str], dict[str, object] | None]:
    """The live extensions beside the boot-time ones (mobynit.tools.live): words, and the record as JSON."""
    import os

    from mobynit.core.sysext import HIERARCHIES
    from mobynit.tools import live
    from mobynit.tools.live_state import Settings

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(live_record)))) or "/"
    s = Settings(root=root, hierarchies=HIERARCHIES, explicit=False, cmdline="", kernel_release="",
                 beneath=False, data_store=None, boot_record=None)
    try:
        rec, _now, note = live.status(s)
    except MobynitError as e:
        return [f"live: {e}"], None
    return render.live(rec, note), (rec.as_json() if rec is not None else None)


def cmd_status(args: Args) -> int:
    """`mobynit status [--record FILE] [--json]`: boot-time extensions, then live ones."""
    rec = BootRecord.read(args.record)
    lines, live_doc = live_lines(args.live_record)
    if args.json:
        doc = rec.as_json()
        doc["live"] = live_doc
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(describe(rec) + "".join(f"{line}\n" for line in lines))
    return 0


def cmd_boot(args: Args) -> int:
    """`mobynit boot`: what /init runs, reached through the CLI."""
    from mobynit.initrd.boot import main

    main()
    return 0  # not reached: main() exits
