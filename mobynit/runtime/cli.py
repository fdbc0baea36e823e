"""mobynit-runtime's command line: runc's flag syntax, parsed, and the command run."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from mobynit import __version__
from mobynit.core.errors import MobynitError, UsageError, shown
from mobynit.runtime import OCI_VERSION, PROG
from mobynit.runtime.commands import Options, cmd_create, cmd_delete, cmd_features, cmd_kill, cmd_start, cmd_state, parse_signal
from mobynit.runtime.hooks import HOOK_TIMEOUT, HOOK_TIMEOUT_ENV
from mobynit.runtime.log import Log

GO_RUNTIME = "balena-extension-runtime"
GO_MANAGER = "balena-extension-manager"
ENGINE_ROOT_ENV = "MOBYNIT_RUNTIME_ENGINE_ROOT"

# --- command line ------------------------------------------------------------------

# Flags per command: name -> takes a value. Aliases map to the long name.
# Both conventions are accepted under either name: runc's (what containerd's
# shim passes), ours (--engine-root, --debug) and the Go tool's (--docker-root,
# --log-level).
GLOBAL_FLAGS = {"root": True, "log": True, "log-format": True, "systemd-cgroup": False, "debug": False,
                "engine-root": True, "rootless": True, "criu": True, "log-level": True, "help": False, "version": False}
COMMANDS: dict[str, dict[str, bool]] = {
    "create": {"bundle": True, "pid-file": True, "console-socket": True, "no-pivot": False,
               "no-new-keyring": False, "preserve-fds": True},
    "start": {},
    "state": {},
    "kill": {"all": False},
    "delete": {"force": False},
    "features": {},
}
ALIASES = {"b": "bundle", "a": "all", "f": "force", "docker-root": "engine-root", "h": "help", "v": "version"}
ARITY = {"create": (1, 1), "start": (1, 1), "state": (1, 1), "kill": (1, 2), "delete": (1, 1), "features": (0, 0)}
LOG_LEVELS = {"debug": 0, "info": 1, "warn": 2, "warning": 2, "error": 3}
PROCESS_COMMANDS = (
    "exec", "run", "ps", "pause", "resume", "update", "events", "checkpoint", "restore", "spec", "list", "init",
)
HELP = ("-h", "--help", "-help")
VERSION = ("-v", "--version", "-version")

USAGE = """usage: {prog} [--root DIR] [--log FILE] [--log-format text|json] [--log-level LEVEL]
       {pad} [--engine-root DIR | --docker-root DIR] [--systemd-cgroup] [--debug] COMMAND [OPTIONS] ID

The OCI runtime for hostapp extension containers: it checks an extension,
runs its hooks and exits (register it with dockerd --add-runtime
extension=/usr/bin/{prog}).

commands:
  create [--bundle DIR] [--pid-file FILE] [--console-socket SOCK] ID
                              bundle: default the current directory
  start ID
  state ID                    the OCI state on stdout
  kill [--all] ID [SIGNAL]    name or number; default SIGTERM
  delete [--force] ID
  features

--root: state directory (default $XDG_RUNTIME_DIR/{prog}, else /run/{prog});
--engine-root/--docker-root: the engine's data-root holding the container's
labels (default: read off the rootfs dockerd passes, else /var/lib/docker);
--log-level: debug, info, warn or error (default info).
--help on any command, --version.

environment: {engine_env} (as --engine-root),
             {timeout_env} (seconds a hook may run, default {timeout:g})
"""

COMMAND_USAGE = {
    "create": "create [--bundle DIR] [--pid-file FILE] [--console-socket SOCK] ID\n\n"
              "Check the extension in the bundle (default: the current directory), run its hooks/create,\n"
              "start the proxy process (its pid in --pid-file when given) and record the container as created.",
    "start": "start ID\n\nRun the extension's hooks/start and let the proxy exit 0: the container is stopped.",
    "state": "state ID\n\nPrint the container's OCI state as JSON.",
    "kill": "kill [--all] ID [SIGNAL]\n\nSend SIGNAL (name or number, default SIGTERM) to the proxy.",
    "delete": "delete [--force] ID\n\nRun the extension's hooks/delete and forget the container\n"
              "(--force: also a created one, and whatever its state).",
    "features": "features\n\nWhat `runc features` reports, as far as it applies.",
}


def usage(prog: str) -> str:
    return USAGE.format(prog=prog, pad=" " * len(prog), engine_env=ENGINE_ROOT_ENV, timeout_env=HOOK_TIMEOUT_ENV,
                        timeout=HOOK_TIMEOUT)


def default_root(prog: str) -> str:
    """Without --root: `$XDG_RUNTIME_DIR/<prog>`, else `/run/<prog>` (the Go tool's rule, under either name)."""
    return f"{os.environ.get('XDG_RUNTIME_DIR') or '/run'}/{prog}"


def parse_flags(
    args: Sequence[str], table: Mapping[str, bool], where: str, stop_at_positional: bool
) -> tuple[dict[str, str | bool], list[str]]:
    """runc's flag syntax: `--name value`, `--name=value`, `-name`, `-b value`."""
    flags: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i + 1 :])
            break
        if not arg.startswith("-") or arg == "-":
            if stop_at_positional:
                rest.extend(args[i:])
                break
            rest.append(arg)
            i += 1
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        name = ALIASES.get(name, name)
        prefix = f"{where}: " if where else ""
        if name not in table:
            raise UsageError(f"{prefix}unknown option {shown(arg.partition('=')[0])!r}")
        if table[name]:
            if not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"{prefix}option --{name} needs a value")
                value = args[i]
            flags[name] = value
        else:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"{prefix}option --{name} takes no value, got {shown(value)!r}")
            flags[name] = not eq or value.lower() in ("true", "1")
        i += 1
    return flags, rest


def _asks(args: Sequence[str], words: tuple[str, ...]) -> bool:
    """`--help` or `--version` anywhere before a `--`."""
    for arg in args:
        if arg == "--":
            return False
        if arg in words:
            return True
    return False


def run(argv: Sequence[str], log: Log, prog: str = PROG) -> int:
    """Parse and dispatch; raises MobynitError on failure. `log` is reconfigured from the flags."""
    gflags, rest = parse_flags(argv, GLOBAL_FLAGS, "", stop_at_positional=True)
    fmt = str(gflags.get("log-format", "text"))
    if fmt not in ("text", "json"):
        raise UsageError(f"--log-format must be text or json, not {shown(fmt)!r}")
    level = str(gflags.get("log-level", "info")).lower()
    if level not in LOG_LEVELS:
        raise UsageError(f"--log-level must be debug, info, warn or error, not {shown(level)!r}")
    log.path = str(gflags["log"]) if "log" in gflags else None
    log.fmt = fmt
    log.threshold = 0 if gflags.get("debug") else LOG_LEVELS[level]
    log("debug", f"called as {json.dumps([prog, *argv])}")
    if gflags.get("help"):
        sys.stdout.write(usage(prog))
        return 0
    if gflags.get("version"):
        sys.stdout.write(f"{prog} version {__version__}\nspec: {OCI_VERSION}\n")
        return 0
    if not rest:
        raise UsageError(f"no command given\n{usage(prog)}")
    command, args = rest[0], rest[1:]
    if command in PROCESS_COMMANDS:
        raise UsageError(f"{command!r} is not supported: an extension never runs a process")
    if command not in COMMANDS:
        raise UsageError(f"unknown command {shown(command)!r}\n{usage(prog)}")
    if _asks(args, HELP):
        sys.stdout.write(f"usage: {prog} [global options] {COMMAND_USAGE[command]}\n")
        return 0
    if _asks(args, VERSION):
        sys.stdout.write(f"{prog} version {__version__}\nspec: {OCI_VERSION}\n")
        return 0
    flags, positional = parse_flags(args, COMMANDS[command], command, stop_at_positional=False)
    low, high = ARITY[command]
    if not low <= len(positional) <= high:
        wanted = {0: "no arguments", 1: "an ID", 2: "ID [SIGNAL]"}[high]
        raise UsageError(f"{command}: expected {wanted}, got {len(positional)} arguments")
    engine_root = str(gflags.get("engine-root") or os.environ.get(ENGINE_ROOT_ENV) or "") or None
    root = str(gflags.get("root") or default_root(prog)).rstrip("/") or "/"
    opts = Options(root=root, log=log, engine_root=engine_root)
    if command == "create":
        console = flags.get("console-socket")
        pid_file = flags.get("pid-file")
        cmd_create(opts, positional[0], str(flags.get("bundle") or "."), str(pid_file) if pid_file else None,
                   str(console) if console else None)
    elif command == "start":
        cmd_start(opts, positional[0])
    elif command == "state":
        cmd_state(opts, positional[0])
    elif command == "kill":
        cmd_kill(opts, positional[0], parse_signal(positional[1]) if len(positional) > 1 else signal.SIGTERM)
    elif command == "delete":
        cmd_delete(opts, positional[0], bool(flags.get("force")))
    else:
        cmd_features(opts)
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """One entry point for every name: called (or linked) as balena-extension-manager
    it is the manager, otherwise the runtime under the name it was called by."""
    if prog is None:
        called = os.path.basename(sys.argv[0] if sys.argv else "")
        prog = called if called in (GO_RUNTIME, GO_MANAGER) else PROG
    args = sys.argv[1:] if argv is None else list(argv)
    if prog == GO_MANAGER:
        from mobynit.runtime import manager

        return manager.main(args, prog=GO_MANAGER)
    if args[:1] == ["help"]:
        sys.stdout.write(usage(prog))
        return 0
    if args[:1] == ["version"]:
        args = ["--version"]
    log = Log()
    try:
        return run(args, log, prog)
    except MobynitError as e:
        message = str(e)
    except OSError as e:
        message = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    if log.path is not None:
        log("error", message.splitlines()[0])
    sys.stderr.write(f"{prog}: {message}\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
