"""The `mobynit` command: plan, mount, assemble (and boot, status).

Errors are caught here, once: a MobynitError becomes one line on stderr and
exit status 1. argparse is imported only when this module is: the boot path
proper (`mobynit boot`) goes through it too, so keep it lean.
"""

from __future__ import annotations

import os
import sys

from mobynit.errors import MobynitError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from mobynit.assemble import Layout
    from mobynit.plan import Plan


def _layout_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--sysroot", required=True, metavar="DIR", help="root partition (holds current and the hostapp store)")
    p.add_argument("--hostapp-store", metavar="DIR", help="hostapp store (default: SYSROOT/balena)")
    if data:
        p.add_argument("--data", metavar="DIR", help="data partition (holds the extension store); none: hostapp only")
        p.add_argument("--data-store", metavar="DIR", help="extension store (default: DATA/docker)")
        p.add_argument("--purge-marker", metavar="FILE", help="file whose absence means a data reset is pending (default: DATA/remove_me_to_reset)")


def _kernel_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cmdline", metavar="TEXT", help="kernel command line (default: /proc/cmdline)")
    src.add_argument("--cmdline-file", metavar="FILE", help="read the kernel command line from FILE")
    p.add_argument("--kernel-release", metavar="REL", help="running kernel release (default: uname -r)")
    p.add_argument("--page-size", type=int, metavar="N", help="page size bounding mount options (default: the system's)")


def _workdir_arg(p: argparse.ArgumentParser) -> None:
    from mobynit.assemble import DEFAULT_WORKDIR

    p.add_argument("--workdir", default=DEFAULT_WORKDIR, metavar="DIR", help=f"where intermediate mounts go (default: {DEFAULT_WORKDIR})")


def _layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("auto", "nested"), default="auto",
                   help="auto: flat when the layers' facts allow it, else nested (default); nested: always nest")


def parser() -> argparse.ArgumentParser:
    import argparse

    from mobynit import __version__
    from mobynit.assemble import DEFAULT_RECORD, DEFAULT_TARGET

    top = argparse.ArgumentParser(prog="mobynit", description="Assemble a read-only root from a container store.")
    top.add_argument("--version", action="version", version=f"mobynit {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="show what boot would mount, and why; changes nothing")
    _layout_args(p)
    _kernel_args(p)
    p.add_argument("--target", default=DEFAULT_TARGET, metavar="DIR", help=f"where the root would be mounted (default: {DEFAULT_TARGET})")
    _workdir_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON document (see docs/plan-json.md)")
    _layout_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("mount", help="mount a sysroot's hostapp read-only and print where")
    _layout_args(p, data=False)
    p.add_argument("--target", metavar="DIR", help="mount point (default: /run/mobynit/hostapp/<container id>)")
    p.add_argument("--page-size", type=int, metavar="N", help=argparse.SUPPRESS)
    _workdir_arg(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("assemble", help="mount the hostapp and its extensions as one read-only root")
    _layout_args(p)
    _kernel_args(p)
    p.add_argument("--target", required=True, metavar="DIR", help="mount point of the new root")
    _workdir_arg(p)
    _layout_arg(p)
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--record", default=DEFAULT_RECORD, metavar="FILE", help=f"where to write what was done (default: {DEFAULT_RECORD})")
    rec.add_argument("--no-record", dest="record", action="store_const", const=None, help="write no record")
    p.add_argument("--quiet", action="store_true", help="no decision lines on stderr")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("index", help="record each layer's whiteouts and opaque dirs, so boot can mount flat")
    _layout_args(p)
    p.add_argument("--kernel-release", metavar="REL", help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="walk layers again even if their facts are recorded")
    p.set_defaults(func=cmd_index)

    _register_extra(sub)
    return top


def _register_extra(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Commands that live beside their concern: `boot` and `status` (mobynit.boot)."""
    try:
        from mobynit import boot
    except ImportError:
        return
    register = getattr(boot, "register", None)
    if register is not None:
        register(sub)


def _layout(args: argparse.Namespace) -> Layout:
    from mobynit.assemble import locate

    return locate(
        args.sysroot,
        getattr(args, "data", None),
        hostapp_store=args.hostapp_store,
        data_store=getattr(args, "data_store", None),
        purge_marker=getattr(args, "purge_marker", None),
    )


def _cmdline_text(args: argparse.Namespace) -> str:
    if args.cmdline is not None:
        return args.cmdline
    path = args.cmdline_file or "/proc/cmdline"
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read the kernel command line from {path}: {e.strerror}") from None


def _page_size(args: argparse.Namespace) -> int:
    if args.page_size is None:
        return os.sysconf("SC_PAGE_SIZE")
    if args.page_size < 64:
        raise UsageError(f"--page-size {args.page_size} is too small to mean anything")
    return args.page_size


def _plan(args: argparse.Namespace) -> Plan:
    from mobynit.assemble import make_plan, select
    from mobynit.cmdline import Cmdline

    sel = select(_layout(args), Cmdline(_cmdline_text(args)), args.kernel_release or os.uname().release)
    return make_plan(sel, target=args.target, workdir=args.workdir, page_size=_page_size(args), layout=_layout_choice(args))


def _layout_choice(args: argparse.Namespace) -> str | None:
    return None if args.layout == "auto" else args.layout


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if args.json:
        import json

        json.dump(plan.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(render(plan))
    return 0


def render(plan: Plan) -> str:
    """The plan for people: decisions first, then the exact operations."""
    from mobynit.errors import shown
    from mobynit.model import OVERRIDE

    h = plan.hostapp
    out = [f"hostapp: {shown(h.name)} {h.id}"]
    out += [f"  layer {layer.path}" for layer in h.layers]
    if plan.disabled_by:
        out.append(f"extensions: disabled by {shown(plan.disabled_by)}")
    elif plan.disabled_reason:
        out.append(f"extensions: {plan.disabled_reason}")
    else:
        out.append(f"extensions: {len(plan.decisions)} found, {len(plan.included)} included")
    for d in plan.decisions:
        name = shown(d.extension.name)
        if d.position == OVERRIDE:
            where = f"override {d.priority}" if d.priority is not None else "override (unranked)"
        else:
            where = "normal"
        if d.included:
            out.append(f"  + {name:<24} {where}")
        else:
            out.append(f"  - {name:<24} {where}: {d.reason}")
        if d.warning:
            out.append(f"    warning: {d.warning}")
    out.append(f"mounts (page size {plan.page_size}):")
    out += [f"  {op.describe()}" for op in plan.operations]
    return "\n".join(out) + "\n"


def cmd_mount(args: argparse.Namespace) -> int:
    from mobynit.assemble import make_plan, mount_plan, select
    from mobynit.cmdline import Cmdline

    sel = select(_layout(args), Cmdline(""), os.uname().release, extensions=False)
    target = args.target or f"/run/mobynit/hostapp/{sel.hostapp.id}"
    os.makedirs(target, exist_ok=True)
    mount_plan(sel, target=target, workdir=args.workdir, page_size=_page_size(args), log=lambda line: None)
    print(target)
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from mobynit.assemble import assemble, write_record

    def log(line: str) -> None:
        if not args.quiet:
            print(f"mobynit: {line}", file=sys.stderr)

    if not os.path.isdir(args.target):
        raise UsageError(f"target {args.target} is not a directory")
    where = _layout(args)
    record = assemble(
        sysroot=where.sysroot,
        data=where.data,
        target=args.target,
        cmdline=_cmdline_text(args),
        kernel_release=args.kernel_release or os.uname().release,
        page_size=_page_size(args),
        workdir=args.workdir,
        log=log,
        hostapp_store=where.hostapp_store,
        data_store=where.data_store,
        purge_marker=where.purge_marker,
        layout=_layout_choice(args),
    )
    if args.record:
        try:
            write_record(args.record, record)
        except OSError as e:
            log(f"warning: cannot write the record {args.record}: {e.strerror}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Walk every layer of the hostapp and of each readable extension once."""
    import os.path

    from mobynit import facts
    from mobynit.assemble import select
    from mobynit.cmdline import Cmdline

    sel = select(_layout(args), Cmdline(""), args.kernel_release or os.uname().release)
    containers = [sel.hostapp] + [d.extension.container for d in sel.decisions if d.extension.container]
    layers = {layer.id: os.path.dirname(layer.path) for c in containers for layer in c.layers}
    try:
        written = facts.index(sorted(layers.items()), force=args.force)
    except OSError as e:
        raise MobynitError(f"cannot record layer facts: {e.filename}: {e.strerror}") from None
    print(f"{len(written)} of {len(layers)} layers indexed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MobynitError as e:
        print(f"mobynit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
