"""mobynit-extension-manager: remove extension containers the device no longer wants.

`cleanup` removes the extension containers the engine reports as garbage:
dead ones, and those whose create or start failed (the engine records the
runtime's error on them). `cleanup --stale-os` also removes those that no
longer suit the running system: the kernel checks the assembler applies at
boot (`io.balena.image.kernel-version`, `io.balena.image.kernel-abi-id` and
Module.symvers vs the command line's `balena_kernel_abi=`), and
`io.balena.image.os-version`, comma-separated shell globs matched against
`VERSION_ID` of /etc/os-release (no label: kept; a label naming no
pattern: stale, as at boot). Run `--stale-os` only once an OS update is committed: before
that, a stale extension is what a rollback returns to.

Before a stale extension goes, each of its volumes gets its chance to undo
what the extension set up there: an executable `deactivate` at the top of the
volume runs with the hook environment of the runtime. If it fails, the
container is kept (and the command fails), so the next run tries again.

The engine is reached over its unix socket with the standard library, and
every request has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import attrs

from mobynit.core import cmdline
from mobynit.core import compat
from mobynit.core import labels as label
from mobynit.core import policy
from mobynit.core import layers
from mobynit.core.errors import MobynitError, shown
from mobynit.runtime import RuntimeFailure
from mobynit.runtime.engine import DEFAULT_HOST, EngineAPIError, EngineClient
from mobynit.runtime.hooks import hook_env, run_hook

PROG = "mobynit-extension-manager"
DEACTIVATE = "deactivate"


# --- what the manager looks at -------------------------------------------------------


@attrs.frozen
class Volume:
    name: str
    source: str
    destination: str


@attrs.frozen
class Candidate:
    """An extension container as the engine describes it."""

    id: str
    name: str
    status: str  # created, exited, dead, removing, running...
    error: str  # the engine's record of a failed create or start; "" if none
    labels: Mapping[str, str]
    volumes: tuple[Volume, ...]
    layers: tuple[str, ...]  # its overlay layer dirs, top first, for the module probe

    @property
    def short(self) -> str:
        return f"{self.name} ({self.id[:12]})"

    @classmethod
    def from_inspect(cls, doc: Mapping[str, object]) -> Candidate:
        """From `GET /containers/<id>/json`; a missing or mistyped field reads as empty."""
        state, config = _obj(doc.get("State")), _obj(doc.get("Config"))
        data = _obj(_obj(doc.get("GraphDriver")).get("Data"))
        mounts = doc.get("Mounts")
        volumes = []
        for m in map(_obj, mounts if isinstance(mounts, list) else ()):
            if m.get("Type") == "volume" and isinstance(m.get("Source"), str) and m["Source"]:
                volumes.append(Volume(str(m.get("Name", "")), m["Source"], str(m.get("Destination", ""))))
        layers = [d for key in ("UpperDir", "LowerDir") if isinstance(data.get(key), str)
                  for d in str(data[key]).split(":") if d]
        return cls(
            id=str(doc.get("Id", "")),
            name=str(doc.get("Name", "")).removeprefix("/"),
            status=str(state.get("Status", "")),
            error=str(state.get("Error") or ""),
            labels={str(k): str(v) for k, v in _obj(config.get("Labels")).items()},
            volumes=tuple(volumes),
            layers=tuple(layers),
        )


def _obj(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}


@attrs.frozen
class System:
    """The running system the stale checks compare against."""

    kernel_release: str
    abi_token: str | None
    os_version: str


def garbage_reason(c: Candidate) -> str | None:
    """Why the engine's own record says this container is garbage, or None."""
    if c.status == "dead":
        return "the engine marked it dead"
    if c.error and c.status in ("created", "exited"):
        return f"it failed: {shown(c.error, 200)}"
    return None


def stale_reason(c: Candidate, system: System, probe: Callable[[Sequence[str], str], object]) -> str | None:
    """Why this extension no longer suits the running system, or None.

    The checks are the assembler's own (mobynit.core.policy for the kernel,
    mobynit.core.compat for the OS version), so the manager removes exactly what
    the next boot would refuse for those reasons.
    """
    modules = probe(c.layers, system.kernel_release) if c.layers else None
    verdict = policy.kernel_verdict(
        c.labels, modules, system.kernel_release, system.abi_token, unverified_ok=True  # type: ignore[arg-type]
    )
    if verdict is not None:
        return verdict
    return compat.os_version_verdict(c.labels, system.os_version)


def deactivate(c: Candidate, log: Callable[[str], None], timeout: float | None = None) -> None:
    """Run each volume's `deactivate` hook; RuntimeFailure on the first that fails."""
    volumes = {v.destination: v.source for v in c.volumes}
    env = hook_env(None, c.labels, volumes)
    for v in c.volumes:
        hook = os.path.join(v.source, DEACTIVATE)
        if run_hook(hook, env, _HookLog(log), cwd=v.source, timeout=timeout):
            log(f"{c.short}: ran {hook}")


class _HookLog:
    """run_hook's logger interface, printing only what an operator needs."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def __call__(self, level: str, msg: str) -> None:
        if level in ("warning", "error"):
            self.log(msg)


@attrs.frozen
class Outcome:
    removed: tuple[tuple[str, str], ...]  # (container, reason)
    failures: tuple[str, ...]


def cleanup(
    client: EngineClient,
    stale_os: bool,
    system: System | None,
    log: Callable[[str], None],
    probe: Callable[[Sequence[str], str], object] = layers.probe_modules,
    hook_timeout: float | None = None,
) -> Outcome:
    """One pass over the engine's extension containers; see the module docstring."""
    removed: list[tuple[str, str]] = []
    failures: list[str] = []
    for summary in client.containers():
        labels = summary.get("Labels") or {}
        if not isinstance(labels, dict) or not label.is_extension(labels):
            continue
        doc = client.inspect(str(summary.get("Id", "")))
        if doc is None:
            continue
        c = Candidate.from_inspect(doc)
        reason = garbage_reason(c)
        if reason is None and stale_os and c.status not in ("running", "paused", "restarting", "removing"):
            assert system is not None
            try:
                reason = stale_reason(c, system, probe)
            except MobynitError as e:  # an unreadable Module.symvers: the boot skips it too
                reason = str(e)
            if reason is not None:
                try:
                    deactivate(c, log, hook_timeout)
                except RuntimeFailure as e:
                    failures.append(f"{c.short}: kept, its deactivate hook failed: {e}")
                    continue
        if reason is None:
            continue
        try:
            client.remove(c.id)
        except EngineAPIError as e:
            failures.append(f"{c.short}: cannot remove: {e}")
            continue
        removed.append((c.short, reason))
        log(f"removed {c.short}: {reason}")
    return Outcome(tuple(removed), tuple(failures))


# --- the running system ----------------------------------------------------------------


def read_os_version(path: str) -> str:
    """VERSION_ID from an os-release file.

    Required: removing is not undone, so without a version to compare with
    nothing is judged stale (the boot, which only skips, may be less strict).
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise MobynitError(f"cannot read {path}: {e.strerror}") from None
    version = compat.parse_os_release(text).get("VERSION_ID")
    if not version:
        raise MobynitError(f"{path} has no VERSION_ID: cannot tell which extensions suit this OS")
    return version


def running_system(kernel_release: str | None, cmdline_path: str, os_release: str) -> System:
    try:
        token = cmdline.read(cmdline_path).get(policy.CMDLINE_ABI)
    except OSError as e:
        raise MobynitError(f"cannot read {cmdline_path}: {e.strerror}") from None
    return System(kernel_release or os.uname().release, token, read_os_version(os_release))


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Remove extension containers the device no longer wants.")
    p.add_argument("--host", default=os.environ.get("DOCKER_HOST", DEFAULT_HOST),
                   help=f"engine API socket as unix:///path (default $DOCKER_HOST or {DEFAULT_HOST})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds each engine request may take (default 30)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("cleanup", help="remove dead and failed extension containers")
    c.add_argument("--stale-os", action="store_true",
                   help="also remove those whose kernel or OS-version labels no longer match"
                   " (only after an OS update is committed)")
    c.add_argument("--os-release", default="/etc/os-release", help="where VERSION_ID is read (default /etc/os-release)")
    c.add_argument("--kernel-release", help="the running kernel release (default: uname -r)")
    c.add_argument("--cmdline", default="/proc/cmdline", help="the kernel command line file (default /proc/cmdline)")
    c.add_argument("--hook-timeout", type=float, default=None, help="seconds a deactivate hook may run (default 60)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(msg: str) -> None:
        sys.stderr.write(f"{PROG}: {msg}\n")

    try:
        if not args.timeout > 0:
            raise MobynitError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
        client = EngineClient.from_host(args.host, args.timeout)
        system = running_system(args.kernel_release, args.cmdline, args.os_release) if args.stale_os else None
        if system is not None:
            log(f"running kernel {system.kernel_release}, {policy.CMDLINE_ABI}={system.abi_token or '(none)'},"
                f" OS version {system.os_version}")
        outcome = cleanup(client, args.stale_os, system, log, hook_timeout=args.hook_timeout)
    except MobynitError as e:
        log(str(e))
        return 1
    for failure in outcome.failures:
        log(failure)
    if not outcome.removed and not outcome.failures:
        log("nothing to remove")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
