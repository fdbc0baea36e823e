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
from mobynit.runtime.spec import DEFAULT_ENGINE_ROOT

DEFAULT_ROOT = "/run/mobynit-runtime"
ENGINE_ROOT_ENV = "MOBYNIT_RUNTIME_ENGINE_ROOT"

# --- command line ------------------------------------------------------------------

# Flags per command: name -> takes a value. Aliases map to the long name.
GLOBAL_FLAGS = {"root": True, "log": True, "log-format": True, "systemd-cgroup": False, "debug": False,
                "engine-root": True, "rootless": True, "criu": True}
COMMANDS: dict[str, dict[str, bool]] = {
    "create": {"bundle": True, "pid-file": True, "console-socket": True, "no-pivot": False,
               "no-new-keyring": False, "preserve-fds": True},
    "start": {},
    "state": {},
    "kill": {"all": False},
    "delete": {"force": False},
    "features": {},
}
ALIASES = {"b": "bundle", "a": "all", "f": "force"}
ARITY = {"create": (1, 1), "start": (1, 1), "state": (1, 1), "kill": (1, 2), "delete": (1, 1), "features": (0, 0)}
PROCESS_COMMANDS = (
    "exec", "run", "ps", "pause", "resume", "update", "events", "checkpoint", "restore", "spec", "list", "init",
)

USAGE = f"""usage: {PROG} [--root DIR] [--log FILE] [--log-format text|json] [--systemd-cgroup] [--debug]
                       [--engine-root DIR] COMMAND [OPTIONS] ID

The runc-compatible runtime for extension containers (register it with
dockerd --add-runtime extension={PROG}).

commands:
  create --bundle DIR --pid-file FILE [--console-socket SOCK] ID
  start ID
  state ID
  kill ID [SIGNAL]            (name or number; default SIGTERM)
  delete [--force] ID
  features

environment: {ENGINE_ROOT_ENV} (engine data-root, default {DEFAULT_ENGINE_ROOT}),
             {HOOK_TIMEOUT_ENV} (seconds, default {HOOK_TIMEOUT:g})
"""


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
        if name not in table:
            raise UsageError(f"{where}: unknown option {shown(arg.partition('=')[0])!r}")
        if table[name]:
            if not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"{where}: option --{name} needs a value")
                value = args[i]
            flags[name] = value
        else:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"{where}: option --{name} takes no value, got {shown(value)!r}")
            flags[name] = not eq or value.lower() in ("true", "1")
        i += 1
    return flags, rest


def run(argv: Sequence[str], log: Log) -> int:
    """Parse and dispatch; raises MobynitError on failure. `log` is reconfigured from the flags."""
    gflags, rest = parse_flags(argv, GLOBAL_FLAGS, PROG, stop_at_positional=True)
    fmt = str(gflags.get("log-format", "text"))
    if fmt not in ("text", "json"):
        raise UsageError(f"--log-format must be text or json, not {shown(fmt)!r}")
    log.path = str(gflags["log"]) if "log" in gflags else None
    log.fmt = fmt
    log.threshold = 0 if gflags.get("debug") else 1
    log("debug", f"called as {json.dumps(list(argv))}")
    if not rest:
        raise UsageError(f"no command given\n{USAGE}")
    command, args = rest[0], rest[1:]
    if command in PROCESS_COMMANDS:
        raise UsageError(f"{command!r} is not supported: an extension never runs a process")
    if command not in COMMANDS:
        raise UsageError(f"unknown command {shown(command)!r}\n{USAGE}")
    flags, positional = parse_flags(args, COMMANDS[command], f"{PROG} {command}", stop_at_positional=False)
    low, high = ARITY[command]
    if not low <= len(positional) <= high:
        wanted = {0: "no arguments", 1: "an ID", 2: "ID [SIGNAL]"}[high]
        raise UsageError(f"{PROG} {command}: expected {wanted}, got {len(positional)} arguments")
    engine_root = str(gflags.get("engine-root") or os.environ.get(ENGINE_ROOT_ENV) or DEFAULT_ENGINE_ROOT)
    opts = Options(root=str(gflags.get("root", DEFAULT_ROOT)).rstrip("/") or "/", log=log, engine_root=engine_root)
    if command == "create":
        for required in ("bundle", "pid-file"):
            if not flags.get(required):
                raise UsageError(f"{PROG} create: --{required} is required")
        console = flags.get("console-socket")
        cmd_create(opts, positional[0], str(flags["bundle"]), str(flags["pid-file"]), str(console) if console else None)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"], ["help"]):
        sys.stdout.write(USAGE)
        return 0
    if args[:1] in (["-v"], ["--version"], ["version"]):
        sys.stdout.write(f"{PROG} version {__version__}\nspec: {OCI_VERSION}\n")
        return 0
    log = Log()
    try:
        return run(args, log)
    except MobynitError as e:
        message = str(e)
    except OSError as e:
        message = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    if log.path is not None:
        log("error", message.splitlines()[0])
    sys.stderr.write(f"{PROG}: {message}\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
