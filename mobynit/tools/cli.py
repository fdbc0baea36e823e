"""The `mobynit` command: plan, mount, assemble, index, boot, status.

Errors are caught here, once: a MobynitError becomes one line on stderr and
exit status 1 (2 for a wrong command line). The options are parsed by
mobynit.core.options rather than argparse, which alone would cost the boot path
about 15 ms; each command imports what it needs when it runs.
"""

from __future__ import annotations

import posix
import sys

from mobynit.core.errors import MobynitError, StoreError, UsageError
from mobynit.core.fileio import is_dir, make_dirs
from mobynit.core.options import Args, Command, Opt, closest, overview, parse
from mobynit.core.paths import DEFAULT_TARGET, DEFAULT_WORKDIR
from mobynit.core.record import DEFAULT_RECORD

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from mobynit.core.cmdline import Cmdline
    from mobynit.core.paths import StorePaths
    from mobynit.core.plan import Plan

PROG = "mobynit"


def _layout_opts(data: bool = True) -> list[Opt]:
    opts = [
        Opt("--sysroot", "DIR", "root partition (holds current and the hostapp store)", required=True),
        Opt("--hostapp-store", "DIR", "hostapp store (default: SYSROOT/balena)"),
    ]
    if data:
        opts += [
            Opt("--data", "DIR", "data partition (holds the extension store); none: hostapp only"),
            Opt("--data-store", "DIR", "extension store (default: DATA/docker)"),
            Opt("--purge-marker", "FILE", "its absence means a data reset is pending (default: DATA/remove_me_to_reset)"),
        ]
    return opts


def _kernel_opts() -> list[Opt]:
    return [
        Opt("--cmdline", "TEXT", "kernel command line (default: /proc/cmdline)"),
        Opt("--cmdline-file", "FILE", "read the kernel command line from FILE"),
        Opt("--kernel-release", "REL", "running kernel release (default: uname -r)"),
        Opt("--page-size", "N", "page size bounding mount options (default: the system's)", convert=int),
    ]


_WORKDIR = Opt("--workdir", "DIR", f"where intermediate mounts and links go (default: {DEFAULT_WORKDIR})", default=DEFAULT_WORKDIR)
_LAYOUT = Opt("--layout", "auto|nested", "auto: flat when the layers' facts allow it, else nested (default); nested: always nest",
              default="auto", choices=("auto", "nested"))
_CMDLINE_SOURCES = ("--cmdline", "--cmdline-file")


def commands() -> list[Command]:
    return [
        Command(
            "plan", "Show what boot would mount, and why; changes nothing.",
            [*_layout_opts(), *_kernel_opts(),
             Opt("--target", "DIR", f"where the root would be mounted (default: {DEFAULT_TARGET})", default=DEFAULT_TARGET),
             _WORKDIR, _LAYOUT, Opt("--json", None, "print one JSON document (see docs/plan-json.md)", default=False)],
            cmd_plan, exclusive=[_CMDLINE_SOURCES],
        ),
        Command(
            "mount", "Mount a sysroot's hostapp read-only and print where (for OS updaters).",
            [*_layout_opts(data=False),
             Opt("--target", "DIR", "mount point (default: /run/mobynit/hostapp/<container id>)"),
             Opt("--page-size", "N", convert=int, hidden=True), _WORKDIR],
            cmd_mount,
        ),
        Command(
            "assemble", "Mount the hostapp and its extensions as one read-only root.",
            [*_layout_opts(), *_kernel_opts(), Opt("--target", "DIR", "mount point of the new root", required=True),
             _WORKDIR, _LAYOUT,
             Opt("--record", "FILE", f"where to write what was done (default: {DEFAULT_RECORD})", default=DEFAULT_RECORD),
             Opt("--no-record", None, "write no record", dest="record", const=None),
             Opt("--quiet", None, "no decision lines on stderr", default=False),
             Opt("--attempts", "FILE", "count boots with extensions here; give up on them after mobynit.max_tries unconfirmed ones")],
            cmd_assemble, exclusive=[_CMDLINE_SOURCES, ("--record", "--no-record")],
        ),
        Command(
            "confirm", "Confirm that this boot is healthy: its extensions keep their place at the next boot.",
            [Opt("--data", "DIR", "the data partition (default: /mnt/data)", default="/mnt/data"),
             Opt("--attempts", "FILE", "the attempts file (default: DATA/mobynit/boot-attempts.json)"),
             Opt("--retry-extensions", None, "after a fallback to the hostapp alone, try the extensions again", default=False)],
            cmd_confirm,
        ),
        Command(
            "index", "Record each layer's whiteouts and opaque directories, so boot can mount one flat overlay.",
            [*_layout_opts(), Opt("--kernel-release", "REL", hidden=True),
             Opt("--force", None, "walk layers again even if their facts are recorded", default=False)],
            cmd_index,
        ),
        *_live_commands(),
        Command("boot", "Assemble the root and prepare the handover (run by the initramfs /init as PID 1).",
                [], "mobynit.tools.status:cmd_boot"),
        Command(
            "status", "Print the record of how this system was booted.",
            [Opt("--record", "FILE", f"the boot record (default: {DEFAULT_RECORD})", default=DEFAULT_RECORD),
             Opt("--json", None, "print the record as JSON", default=False),
             Opt("--live-record", "FILE", "the live record (default: /run/mobynit/live.json)",
                 default="/run/mobynit/live.json", hidden=True)],
            "mobynit.tools.status:cmd_status",
        ),
    ]


def _live_commands() -> list[Command]:
    """merge, unmerge, refresh, list: live layering (mobynit.tools.live, docs/live.md)."""
    common = [
        Opt("--root", "DIR", "operate on the tree at DIR instead of / (its run/mobynit holds the record)"),
        Opt("--hierarchy", "LIST", "comma-separated hierarchies to overlay (default: /usr,/opt)"),
        Opt("--json", None, "print the record as JSON", default=False),
        Opt("--quiet", None, "no notes on stderr", default=False),
        Opt("--data-store", "DIR", "the container extensions' store (default: /mnt/data/docker with --root /)"),
        Opt("--boot-record", "FILE", "the boot record: extensions in it are already in the root", hidden=True),
        Opt("--cmdline", "TEXT", "kernel command line (default: /proc/cmdline)", hidden=True),
        Opt("--kernel-release", "REL", "running kernel release (default: uname -r)", hidden=True),
        Opt("--no-beneath", None, "replace overlays by detach-then-attach, as on kernels before 6.5", default=False,
            hidden=True),
    ]
    return [
        Command("merge", "Merge sysext images and live-capable container extensions into the running /usr and /opt.",
                common, "mobynit.tools.live:cmd_merge"),
        Command("unmerge", "Remove the live overlays: the booted view again.", common, "mobynit.tools.live:cmd_unmerge"),
        Command("refresh", "Replace the merged set with what is found now, with no moment without the base files.",
                common, "mobynit.tools.live:cmd_refresh"),
        Command("list", "Show every extension found and what a merge would do with it; changes nothing.", common,
                "mobynit.tools.live:cmd_list"),
    ]


def _paths(args: Args) -> StorePaths:
    """The stores the options name; a sysroot that is not there, or a data
    store without a data partition, is a mistake in the command line."""
    from mobynit.core.paths import store_paths

    if not is_dir(args.sysroot):
        raise UsageError(f"--sysroot {args.sysroot}: no such directory")
    if getattr(args, "data", None) is None and (getattr(args, "data_store", None) or getattr(args, "purge_marker", None)):
        given = "--data-store" if getattr(args, "data_store", None) else "--purge-marker"
        raise UsageError(f"{given} needs --data (the data partition it belongs to)")
    return store_paths(
        args.sysroot,
        getattr(args, "data", None),
        hostapp_store=args.hostapp_store,
        data_store=getattr(args, "data_store", None),
        purge_marker=getattr(args, "purge_marker", None),
    )


def _cmdline(args: Args) -> Cmdline:
    from mobynit.core.cmdline import Cmdline

    if args.cmdline is not None:
        return Cmdline(args.cmdline)
    path = args.cmdline_file or "/proc/cmdline"
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return Cmdline(f.read())
    except OSError as e:
        raise UsageError(f"cannot read the kernel command line from {path}: {e.strerror}") from None


def _page_size(args: Args) -> int:
    if args.page_size is None:
        return posix.sysconf("SC_PAGE_SIZE")
    if args.page_size < 64:
        raise UsageError(f"--page-size {args.page_size} is too small to mean anything")
    return args.page_size


def _plan(args: Args) -> Plan:
    """What assemble would do. Raw sysext images are mounted under the work
    directory to be read, as at boot, and detached again before this returns."""
    from mobynit.core.assemble import image_mounts, make_plan, select

    where = _paths(args)
    mounts = image_mounts(where, args.workdir)
    try:
        sel = select(where, _cmdline(args), args.kernel_release or posix.uname().release, images=mounts)
        return make_plan(sel, target=args.target, workdir=args.workdir, page_size=_page_size(args),
                         layout=_layout_choice(args))
    finally:
        if mounts is not None:
            mounts.close()


def _layout_choice(args: Args) -> str | None:
    return None if args.layout == "auto" else args.layout


def cmd_plan(args: Args) -> int:
    plan = _plan(args)
    if args.json:
        import json

        json.dump(plan.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(render(plan))
    return 0


def render(plan: Plan) -> str:
    """The plan for people: the decisions as boot states them, then the exact operations."""
    from mobynit.core import render
    from mobynit.core.record import BootRecord

    out = render.selection(BootRecord.from_plan(plan))
    out[1:1] = [f"  layer {layer.path}" for layer in plan.hostapp.layers]
    out.append(f"mounts (page size {plan.page_size}):")
    out += [f"  {op.describe()}" for op in plan.operations]
    return "\n".join(out) + "\n"


def cmd_mount(args: Args) -> int:
    from mobynit.core.assemble import make_plan, mount_plan, select
    from mobynit.core.cmdline import Cmdline

    sel = select(_paths(args), Cmdline(""), posix.uname().release, extensions=False)
    target = args.target or f"/run/mobynit/hostapp/{sel.hostapp.id}"
    make_dirs(target)
    mount_plan(sel, target=target, workdir=args.workdir, page_size=_page_size(args), log=lambda line: None)
    print(target)
    return 0


def cmd_assemble(args: Args) -> int:
    from mobynit.core import attempts
    from mobynit.core.assemble import assemble

    def log(line: str) -> None:
        if not args.quiet:
            print(f"mobynit: {line}", file=sys.stderr)

    if not is_dir(args.target):
        raise UsageError(f"target {args.target} is not a directory")
    record = assemble(
        _paths(args),
        target=args.target,
        cmdline=_cmdline(args),
        kernel_release=args.kernel_release or posix.uname().release,
        page_size=_page_size(args),
        workdir=args.workdir,
        log=log,
        layout=_layout_choice(args),
        attempts_file=attempts.named(args.attempts, args.data) if args.attempts else None,
    )
    if args.record:
        try:
            record.write(args.record)
        except StoreError as e:
            log(f"warning: cannot write the record: {e}")
    return 0


def cmd_confirm(args: Args) -> int:
    from mobynit.core import attempts

    where = attempts.named(args.attempts, args.data) if args.attempts else attempts.state_path(args.data)
    previous = attempts.read(where)
    now, message = attempts.confirmed(previous, args.retry_extensions)
    if now != previous:
        try:
            for planted in attempts.write(where, now):
                print(f"{PROG}: warning: {planted} was not a directory (a symlink or a file): replaced", file=sys.stderr)
        except StoreError as e:
            raise MobynitError(f"cannot record the confirmation: {e}") from None
    print(f"{PROG}: {message}")
    return 0


def cmd_index(args: Args) -> int:
    """Walk every layer of the hostapp and of each readable extension once."""
    from mobynit.core.assemble import index_stores

    written, total = index_stores(_paths(args), args.kernel_release or posix.uname().release, force=args.force)
    print(f"{written} of {total} layers indexed")
    return 0


def run() -> None:
    """The entry of a launch line like the initramfs's (`python3 -S -B -P -c 'import gc;
    gc.disable(); from mobynit.tools.cli import run; run()' assemble ...`): main, then
    the streams flushed and the process ended without the interpreter's teardown."""
    from mobynit.core import process

    process.short_lived()
    process.finish(main())


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    try:
        if not words or words[0] in ("-h", "--help"):
            sys.stdout.write(overview(PROG, "Assemble a read-only root from a container store.", table))
            return 0 if words else 2
        if words[0] == "--version":
            from mobynit import __version__

            print(f"{PROG} {__version__}")
            return 0
        command = next((c for c in table if c.name == words[0]), None)
        if command is None:
            near = closest(words[0], [c.name for c in table])
            hint = f" (did you mean {near}?)" if near else ""
            raise UsageError(f"unknown command {words[0]!r}{hint}; commands: {', '.join(c.name for c in table)}")
        args = parse(command, words[1:], PROG)
        if args is None:
            sys.stdout.write(command.usage(PROG))
            return 0
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(command.function()(args))
    except MobynitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        return 130
