"""The runtime's commands: create, start, kill, delete, state, features."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping

from mobynit.core.errors import MobynitError, UsageError, shown
from mobynit.core.fileio import write_atomic
from mobynit.core.model import Record
from mobynit.runtime import OCI_VERSION, RuntimeFailure
from mobynit.runtime.hooks import hook_env, run_hook
from mobynit.runtime.log import Log, rfc3339
from mobynit.runtime.proxy import spawn_proxy
from mobynit.runtime.spec import (
    DEFAULT_ENGINE_ROOT,
    derived_engine_root,
    extension_labels,
    read_json,
    refusal,
    resolve_rootfs,
    spec_volumes,
    string_map,
)
from mobynit.runtime.state import CREATED, STOPPED, State, StateDir


def boot_verdict(labels: Mapping[str, str], rootfs: str) -> str | None:
    """What the assembler will say at the next boot: why it would skip this extension."""
    from mobynit.core import cmdline, layers, policy

    release = os.uname().release
    try:
        token = cmdline.read().get(policy.CMDLINE_ABI)
    except OSError:
        token = None
    try:
        modules = layers.probe_modules([rootfs], release)
    except MobynitError as e:
        return str(e)
    return policy.kernel_verdict(labels, modules, release, token)


def index_layers(engine_root: str, cid: str) -> str | None:
    """Record the extension's layer facts now, so the next boot can mount it in
    one flat root (see mobynit.core.facts); returns what went wrong, if anything."""
    from mobynit.core import facts
    from mobynit.core import store

    if not os.path.isdir(f"{engine_root}/image/overlay2/layerdb/mounts/{cid}"):
        return None  # not a container of this engine's store (ctr run, another engine): nothing to index
    try:
        layers = store.Store(engine_root, top=engine_root).layers(cid)
        facts.index([(layer.id, os.path.dirname(layer.path)) for layer in layers])
    except MobynitError as e:
        return f"cannot record its layer facts ({e}); the next boot will nest its layers"
    except OSError as e:
        return f"cannot record its layer facts ({e.filename}: {e.strerror}); the next boot will nest its layers"
    return None


def merge_live(cid: str, engine_root: str, root: str = "/") -> tuple[str, str]:
    """Merge the extension into the running system now if it can go live (docs/live.md):
    (log level, what happened). Only on a system booted by mobynit (its boot record
    is in `root`/run/mobynit); anywhere else the extension waits for the next boot.
    A failure here never fails the install: the next boot still applies it."""
    from mobynit.core.sysext import HIERARCHIES
    from mobynit.tools import live
    from mobynit.tools.live_state import Settings, beneath_supported

    if not os.path.exists(os.path.join(root, "run/mobynit/boot.json")):
        return "info", f"extension {cid}: this system was not booted by mobynit; it waits for the next boot"
    s = Settings(root=root, hierarchies=HIERARCHIES, explicit=False, cmdline=_cmdline(),
                 kernel_release=os.uname().release, beneath=beneath_supported(os.uname().release),
                 data_store=engine_root, boot_record=os.path.join(root, "run/mobynit/boot.json"))
    try:
        rec = live.apply(s, "refresh", lambda line: None)
    except (MobynitError, OSError) as e:
        return "warning", f"extension {cid}: not merged live ({e}); it waits for the next boot"
    entry = next((e for e in rec.extensions if e.source == cid), None)
    if entry is None:
        return "warning", f"extension {cid}: not found in {engine_root}; it waits for the next boot"
    if entry.merged:
        return "info", f"extension {cid}: merged live into {', '.join(entry.hierarchies)}"
    return "info", f"extension {cid}: {entry.reason}" + ("" if "next boot" in (entry.reason or "") else "; it waits for the next boot")


def _cmdline() -> str:
    try:
        with open("/proc/cmdline", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return ""


class Options(Record):
    """The global options, as runc takes them."""

    __slots__ = ("root", "log", "engine_root")
    root: str
    log: Log
    engine_root: str | None  # --engine-root/--docker-root or the environment; None: found from the bundle


def engine_roots(opts: Options, rootfs: str, cid: str) -> list[str]:
    """Where to look for the engine's record of the container, in order: the
    root we were told, the one dockerd's rootfs path shows (checked), and the
    default when nobody said anything."""
    roots = [opts.engine_root] if opts.engine_root else []
    derived = derived_engine_root(rootfs, cid)
    if derived is not None:
        roots.append(derived)
    if not opts.engine_root:
        roots.append(DEFAULT_ENGINE_ROOT)
    return list(dict.fromkeys(roots))


def cmd_create(opts: Options, cid: str, bundle: str, pid_file: str | None, console_socket: str | None) -> None:
    log = opts.log
    bundle = os.path.abspath(bundle)
    config = f"{bundle}/config.json"
    with StateDir(opts.root, cid) as ctr:
        if ctr.exists():
            raise RuntimeFailure(f"container {cid} already exists")
        spec = read_json(config, "bundle config")
        rootfs = resolve_rootfs(spec, bundle, config)
        annotations = string_map(spec.get("annotations"), f"{config}: annotations")
        roots = engine_roots(opts, rootfs, cid)
        found = extension_labels(annotations, roots, cid, bundle)
        why = refusal(found.labels)
        if why is not None:
            where = found.source if found.source != "the OCI annotations" or len(found.looked) == 1 else (
                "any of " + ", ".join(found.looked))
            raise RuntimeFailure(f"container {cid} is not an extension: {why} (looked in {where}); run it with another runtime")
        labels = found.labels
        volumes = spec_volumes(spec, config)
        verdict = boot_verdict(labels, rootfs)
        if verdict is not None:
            log("warning", f"extension {cid} will be skipped at the next boot: {verdict}")
        problem = index_layers(found.engine_root or roots[0], cid)
        if problem is not None:
            log("warning", f"extension {cid}: {problem}")
        run_hook(f"{rootfs}/hooks/create", hook_env(rootfs, labels, volumes), log, cwd=rootfs)
        pid, start = spawn_proxy(console_socket)
        try:
            state = State(
                id=cid,
                status=CREATED,
                pid=pid,
                proxy_start=start,
                bundle=bundle,
                rootfs=rootfs,
                created=rfc3339(),
                labels=labels,
                volumes=volumes,
            )
            ctr.save(state)
            if pid_file:
                write_atomic(os.path.abspath(pid_file), f"{pid}".encode())
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            if ctr.exists():
                ctr.remove()
            raise
        log("info", f"created extension {cid} (proxy pid {pid}, labels from {found.source})")


def cmd_start(opts: Options, cid: str) -> None:
    with StateDir(opts.root, cid) as ctr:
        state = ctr.load()
        status = state.current_status()
        if status != CREATED:
            raise RuntimeFailure(f"cannot start container {cid}: it is {status}, not created")
        run_hook(f"{state.rootfs}/hooks/start", state.hook_env(), opts.log, cwd=_cwd(state.rootfs))
        ctr.save(state.replace(status=STOPPED))
        _signal_proxy(state, signal.SIGUSR1)
        opts.log("info", f"started extension {cid}: it is installed and stopped")
        # The engine's data-root as create found it (from the rootfs path dockerd passes), not a default.
        level, said = merge_live(cid, opts.engine_root or derived_engine_root(state.rootfs, cid) or DEFAULT_ENGINE_ROOT)
        opts.log(level, said)


# Signals that ask for the container to be gone: to a proxy already gone, they are met.
STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGKILL))


def cmd_kill(opts: Options, cid: str, sig: int) -> None:
    """Signal the proxy. SIGTERM or SIGKILL to a container whose proxy is
    already gone succeed (it is stopped, as asked); any other signal then
    fails with runc's `container not running`."""
    with StateDir(opts.root, cid) as ctr:
        state = ctr.load()
        if not state.proxy_alive():
            if sig not in STOP_SIGNALS:
                raise RuntimeFailure(f"cannot kill container {cid}: container not running")
            opts.log("info", f"extension {cid} is already stopped; {signal.Signals(sig).name} not needed")
        else:
            _signal_proxy(state, sig)
        if state.status != STOPPED:
            ctr.save(state.replace(status=STOPPED))
        opts.log("info", f"sent {signal.Signals(sig).name} to extension {cid}")


def cmd_delete(opts: Options, cid: str, force: bool) -> None:
    """Refuses a created container unless forced. --force always forgets the
    container: when its delete hook fails (and still reports the failure),
    and when its state cannot be read or is not what we wrote (a warning)."""
    with StateDir(opts.root, cid) as ctr:
        if force and not ctr.exists():
            ctr.remove()  # whatever sits at its name: a crashed create's leftovers, a planted entry
            return
        try:
            state = ctr.load()
        except RuntimeFailure as e:
            if not force:
                raise
            _forget(opts, ctr, f"its state is unreadable ({e}); no delete hook ran")
            return
        status = state.current_status()
        if status != STOPPED and not force:
            raise RuntimeFailure(f"cannot delete container {cid}: it is {status} (use --force)")
        if state.proxy_alive():
            _signal_proxy(state, signal.SIGKILL)
        try:
            run_hook(f"{state.rootfs}/hooks/delete", state.hook_env(), opts.log, cwd=_cwd(state.rootfs))
        except RuntimeFailure:
            if force:
                _forget(opts, ctr, "its delete hook failed")
            raise
        ctr.remove()
        opts.log("info", f"deleted extension {cid}")


def _forget(opts: Options, ctr: StateDir, why: str) -> None:
    ctr.remove()
    opts.log("warning", f"forgot extension {ctr.id} although {why}")


def _cwd(rootfs: str) -> str:
    """The hook's working directory: the rootfs, or / once the engine unmounted it."""
    return rootfs if os.path.isdir(rootfs) else "/"


def cmd_state(opts: Options, cid: str) -> None:
    with StateDir(opts.root, cid) as ctr:
        state = ctr.load()
    sys.stdout.write(json.dumps(state.oci(), indent=2) + "\n")


def cmd_features(opts: Options) -> None:
    """What `runc features` reports, as far as it applies: no hooks, no namespaces, nothing to tune."""
    doc = {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": [],
        "annotations": {"org.mobynit.runtime.extensions-only": "true"},
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _signal_proxy(state: State, sig: int) -> None:
    if not state.proxy_alive():
        return
    try:
        os.kill(state.pid, sig)
    except ProcessLookupError:
        pass


def parse_signal(text: str) -> int:
    """A signal by number, by name, with or without SIG (`9`, `KILL`, `SIGKILL`, `sigterm`)."""
    if text.isdigit():
        num = int(text)
        if num in signal.valid_signals():
            return num
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise UsageError(f"unknown signal {shown(text)!r}")
