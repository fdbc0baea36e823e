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

Containers go with their anonymous volumes. A stale extension also takes
along its image and its named volumes once nothing else uses them (the engine
refuses to delete what a container still uses, and is never forced), and
`--stale-os` removes extension images whose own labels make them stale even
with no container (what an OS update left behind).

Before a stale extension goes, each of its volumes gets its chance to undo
what the extension set up there: an executable `deactivate` at the top of the
volume runs with the hook environment of the runtime. If it fails, the
failure is reported (exit status 1) and the container removed all the same,
as the tool we replace does; its volumes, which hold the hook and whatever
it did not undo, are kept for an operator.

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
from mobynit.core.record import DEFAULT_RECORD, BootRecord, RecordError
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
    images: tuple[str, ...] = ()  # images removed
    volumes: tuple[str, ...] = ()  # named volumes removed


def cleanup(
    client: EngineClient,
    stale_os: bool,
    system: System | None,
    log: Callable[[str], None],
    probe: Callable[[Sequence[str], str], object] = layers.probe_modules,
    hook_timeout: float | None = None,
    mounted: frozenset[str] = frozenset(),
) -> Outcome:
    """One pass over the engine's extension containers (and, with `stale_os`,
    images); see the module docstring.

    `mounted` are the ids of the extensions the running root is made of (the
    boot record's): they are never removed now, whatever their state. Their
    layers are lower layers of the mounted root; deleting them leaves the root
    with dead directories (a listing of / or /usr fails) until the next boot,
    which leaves a stale extension out anyway; the cleanup after it removes it.
    """
    removed: list[tuple[str, str]] = []
    failures: list[str] = []
    stale_images: dict[str, str] = {}  # image id -> why it goes
    stale_volumes: list[tuple[str, str]] = []  # (volume name, whose it was)
    for summary in client.containers():
        labels = summary.get("Labels") or {}
        if not isinstance(labels, dict) or not label.is_extension(labels):
            continue
        doc = client.inspect(str(summary.get("Id", "")))
        if doc is None:
            continue
        c = Candidate.from_inspect(doc)
        reason = garbage_reason(c)
        stale = keep_volumes = False
        if reason is None and stale_os and c.status not in ("running", "paused", "restarting", "removing"):
            assert system is not None
            try:
                reason = stale_reason(c, system, probe)
            except MobynitError as e:  # an unreadable Module.symvers: the boot skips it too
                reason = str(e)
            stale = reason is not None
        if reason is not None and c.id in mounted:
            log(f"kept {c.short}: {reason}; but the running root is made with it: it goes after the next boot")
            continue
        if reason is None:
            continue
        if stale:
            try:
                deactivate(c, log, hook_timeout)
            except RuntimeFailure as e:
                failures.append(f"{c.short}: its deactivate hook failed: {e}; removed all the same, its volumes kept")
                keep_volumes = True
        try:
            client.remove(c.id)
        except EngineAPIError as e:
            failures.append(f"{c.short}: cannot remove: {e}")
            continue
        removed.append((c.short, reason))
        log(f"removed {c.short}: {reason}")
        if stale:
            image = doc.get("Image")
            if isinstance(image, str) and image:
                stale_images.setdefault(image, f"the image of {c.short}")
            if not keep_volumes:
                stale_volumes.extend((v.name, c.short) for v in c.volumes if v.name)
    images: list[str] = []
    volumes: list[str] = []
    if stale_os:
        assert system is not None
        _stale_images(client, system, probe, stale_images)
        in_use = {str(c.get("ImageID")) for c in client.containers()}
        for image, why in stale_images.items():
            if image in in_use:
                log(f"kept image {_short(image)}: a container still uses it")
                continue
            try:
                done = _remove_image(client, image, why, log)
            except EngineAPIError as e:
                failures.append(f"image {_short(image)}: cannot remove: {e}")
                continue
            if done:
                images.append(image)
        for name, whose in stale_volumes:
            try:
                kept = client.remove_volume(name)
            except EngineAPIError as e:
                failures.append(f"volume {name}: cannot remove: {e}")
                continue
            if kept is not None:
                log(f"kept volume {name} of {whose}: {kept}")
            else:
                volumes.append(name)
                log(f"removed volume {name} of {whose}")
    return Outcome(tuple(removed), tuple(failures), tuple(images), tuple(volumes))


def _short(image: str) -> str:
    return image.removeprefix("sha256:")[:12]


def _stale_images(
    client: EngineClient, system: System, probe: Callable[[Sequence[str], str], object], found: dict[str, str]
) -> None:
    """Add to `found` the extension images whose own labels no longer suit the running system."""
    for summary in client.images():
        labels = summary.get("Labels") or {}
        image = summary.get("Id")
        if not isinstance(labels, dict) or not label.is_extension(labels) or not isinstance(image, str):
            continue
        if image in found:
            continue
        doc = client.inspect_image(image)
        if doc is None:
            continue
        tags = [t for t in summary.get("RepoTags") or () if isinstance(t, str) and t != "<none>:<none>"]
        c = attrs.evolve(Candidate.from_inspect(doc), name=tags[0] if tags else _short(image))
        try:
            reason = stale_reason(c, system, probe)
        except MobynitError as e:
            reason = str(e)
        if reason is not None:
            found[image] = reason


def _remove_image(client: EngineClient, image: str, why: str, log: Callable[[str], None]) -> bool:
    """Each tag, then the image itself, never forced; False when the engine keeps it."""
    doc = client.inspect_image(image)
    if doc is None:
        return False
    tags = [t for t in doc.get("RepoTags") or () if isinstance(t, str) and t != "<none>:<none>"]
    for ref in [*tags, image]:
        if ref == image and client.inspect_image(image) is None:
            break  # the last tag took the image with it
        kept = client.remove_image(ref)
        if kept is not None:
            log(f"kept image {_short(image)}: {kept}")
            return False
    log(f"removed image {', '.join(tags) or _short(image)} ({_short(image)}): {why}")
    return True


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


GO_PROG = "balena-extension-manager"
GO_HOST = "unix:///var/run/balena-engine.sock"  # the Go tool's default, under its name
LEVELS = {"debug": 0, "info": 1, "warn": 2, "warning": 2, "error": 3}


def default_host(prog: str) -> str:
    """$DOCKER_HOST (`unix:///path`, or a bare absolute path as the Go tool takes it), else the engine's socket."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("/"):
        return "unix://" + host
    if host:
        return host
    return GO_HOST if prog == GO_PROG else DEFAULT_HOST


def _parser(prog: str) -> argparse.ArgumentParser:
    from mobynit import __version__

    version = f"{prog} version {__version__}"
    host = default_host(prog)
    p = argparse.ArgumentParser(prog=prog, description="Remove extension containers the device no longer wants.")
    p.add_argument("--version", action="version", version=version)
    p.add_argument("--host", default=host,
                   help=f"engine API socket as unix:///path (default $DOCKER_HOST, else {host})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds each engine request may take (default 30)")
    p.add_argument("--log-level", default="info", choices=sorted(LEVELS),
                   help="info (default) shows what was removed; warn or error only problems")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("cleanup", help="remove dead and failed extension containers")
    c.add_argument("--version", action="version", version=version)
    c.add_argument("--stale-os", action="store_true",
                   help="also remove those whose kernel or OS-version labels no longer match, their images"
                   " and named volumes once unused, and stale extension images"
                   " (only after an OS update is committed)")
    c.add_argument("--os-release", default="/etc/os-release", help="where VERSION_ID is read (default /etc/os-release)")
    c.add_argument("--kernel-release", help="the running kernel release (default: uname -r)")
    c.add_argument("--cmdline", default="/proc/cmdline", help="the kernel command line file (default /proc/cmdline)")
    c.add_argument("--hook-timeout", type=float, default=None, help="seconds a deactivate hook may run (default 60)")
    c.add_argument("--boot-record", default=DEFAULT_RECORD,
                   help=f"the boot record: extensions the running root is made of are kept (default {DEFAULT_RECORD})")
    return p


def running_root(record: str, log: Callable[..., None]) -> frozenset[str]:
    """The ids of the extensions the running root is made of, from the boot record; none without one."""
    try:
        rec = BootRecord.read(record)
    except RecordError as e:
        if not str(e).startswith("no boot record"):
            log(f"{e}: cannot tell which extensions the running root uses", "warning")
        return frozenset()
    return frozenset(e.id for e in rec.included)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = _parser(prog).parse_args(argv)
    threshold = LEVELS[args.log_level]

    def log(msg: str, level: str = "info") -> None:
        if LEVELS[level] >= threshold:
            sys.stderr.write(f"{prog}: {msg}\n")

    try:
        if not args.timeout > 0:
            raise MobynitError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
        client = EngineClient.from_host(args.host, args.timeout)
        system = running_system(args.kernel_release, args.cmdline, args.os_release) if args.stale_os else None
        if system is not None:
            log(f"running kernel {system.kernel_release}, {policy.CMDLINE_ABI}={system.abi_token or '(none)'},"
                f" OS version {system.os_version}")
        outcome = cleanup(client, args.stale_os, system, log, hook_timeout=args.hook_timeout,
                          mounted=running_root(args.boot_record, log))
    except MobynitError as e:
        log(str(e), "error")
        return 1
    for failure in outcome.failures:
        log(failure, "error")
    if not outcome.removed and not outcome.failures and not outcome.images:
        log("nothing to remove")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
