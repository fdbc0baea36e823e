"""mobynit-runtime: the OCI runtime the engine uses for extension containers.

An extension is an image whose files the assembler overlays on the root at
the next boot; nothing in it ever runs as a container. The engine still
insists on a container life cycle, so this runtime speaks runc's command line
to containerd's runc shim and, instead of running a process:

  create  checks the extension, runs its `hooks/create`, forks a proxy
          process (the pid containerd tracks) and records the state;
  start   runs `hooks/start` and tells the proxy to exit 0, so the engine
          shows the container as "Exited (0)";
  kill    signals the proxy;
  delete  runs `hooks/delete` and forgets the container;
  state   prints the OCI state.

Each call takes a lock on its container, so the shim racing `kill` against
`delete` never tears the state, and the state file is replaced atomically, so
a power cut leaves the old state or the new one, never half of either.

containerd calls this several times per container: the module imports little,
and the boot-time checks (policy, store) only at create.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from mobynit.core.errors import MobynitError, UsageError, shown
from mobynit.core.model import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

PROG = "mobynit-runtime"
VERSION = "0.1.0"
OCI_VERSION = "1.0.2"
DEFAULT_ROOT = "/run/mobynit-runtime"
DEFAULT_ENGINE_ROOT = "/var/lib/docker"
ENGINE_ROOT_ENV = "MOBYNIT_RUNTIME_ENGINE_ROOT"
HOOK_TIMEOUT_ENV = "MOBYNIT_RUNTIME_HOOK_TIMEOUT"
HOOK_TIMEOUT = 60.0
HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_LABEL_PREFIX = "io.balena.image."
CLASS_LABEL = "io.balena.image.class"
LEGACY_LABEL = "io.balena.features.host-extension"
# Bind mounts the engine adds to every container; they are not the extension's volumes.
ENGINE_PLUMBING = frozenset(("/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/dev/shm"))
# The proxy exits 0 on these: SIGUSR1 from start, SIGTERM/SIGINT from a stop.
PROXY_SIGNALS = frozenset((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))
CONFIG_LIMIT = 4 << 20

CREATED = "created"
STOPPED = "stopped"


class RuntimeFailure(MobynitError):
    """A runtime command cannot do what it was asked; the state is as it was."""


# --- logging ---------------------------------------------------------------


def rfc3339(t: float | None = None) -> str:
    """UTC time as Go's time.Time decodes it (the shim parses our log's "time")."""
    ns = time.time_ns() if t is None else int(t * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


class Log:
    """runc's log: one JSON (or logfmt) line per message, appended.

    containerd's shim reads the last "error" entry of this file and puts it in
    the error the engine shows, so every failure must end up here.
    """

    LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}

    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self.threshold = 0 if debug else 1

    def __call__(self, level: str, msg: str) -> None:
        if self.LEVELS[level] < self.threshold:
            return
        now = rfc3339()
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now})
        else:
            line = f"time={json.dumps(now)} level={level} msg={json.dumps(msg)}"
        if self.path is None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            sys.stderr.write(f"{PROG}: cannot open log {self.path}: {e.strerror}; {line}\n")
            return
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


# --- small file helpers ----------------------------------------------------


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`: write a sibling, fsync it, rename, fsync the directory.

    After a crash the file holds the old bytes or the new ones, never a mix.
    """
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str, what: str, limit: int = CONFIG_LIMIT) -> dict:
    """A JSON object from the regular file `path` (never through a final
    symlink, at most `limit` bytes); RuntimeFailure naming the file otherwise."""
    from mobynit.core.errors import StoreError
    from mobynit.core.store import read_file

    try:
        raw = read_file(path, limit)
    except StoreError as e:
        raise RuntimeFailure(f"{what} {e}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RuntimeFailure(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RuntimeFailure(f"{what} {path} is not a JSON object")
    return doc


def string_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RuntimeFailure(f"{where} is not a map of strings")
    return dict(value)


# --- the extension: labels, rootfs, volumes, hook environment --------------


def env_suffix(text: str) -> str:
    """`kernel-abi-id` -> `KERNEL_ABI_ID`, `/data/my-vol` -> `DATA_MY_VOL`."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in text.strip("/")).upper()


def _env_safe(value: str) -> bool:
    if "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def hook_env(rootfs: str | None, labels: Mapping[str, str], volumes: Mapping[str, str]) -> dict[str, str]:
    """The whole environment a hook gets: nothing of the engine's leaks in.

    `io.balena.image.<x>` labels become EXTENSION_IMAGE_<X>; each volume,
    by its destination, EXTENSION_VOLUME_<DEST>=<host path>.
    """
    env = {"PATH": HOOK_PATH}
    if rootfs is not None:
        env["EXTENSION_ROOTFS"] = rootfs
    for key in sorted(labels):
        if key.startswith(IMAGE_LABEL_PREFIX) and key != IMAGE_LABEL_PREFIX:
            value = labels[key]
            if not _env_safe(value):
                continue  # a NUL or a lone surrogate cannot go into an environment: left out
            env["EXTENSION_IMAGE_" + env_suffix(key[len(IMAGE_LABEL_PREFIX) :])] = value
    for dest in sorted(volumes):
        suffix = env_suffix(dest)
        if suffix:
            env["EXTENSION_VOLUME_" + suffix] = volumes[dest]
    return env


def spec_volumes(spec: dict, config: str) -> dict[str, str]:
    """The extension's volumes: the bind mounts of the spec other than the engine's own.

    Docker hands named volumes and host binds to the runtime as bind mounts
    (`/var/lib/docker/volumes/<name>/_data` for a volume); the engine adds
    resolv.conf, hostname, hosts and /dev/shm to every container.
    """
    mounts = spec.get("mounts")
    if mounts is None:
        return {}
    if not isinstance(mounts, list):
        raise RuntimeFailure(f"{config}: mounts is not a list")
    volumes: dict[str, str] = {}
    for m in mounts:
        if not isinstance(m, dict):
            raise RuntimeFailure(f"{config}: a mount is not an object")
        dest, source, options = m.get("destination"), m.get("source"), m.get("options") or []
        if not isinstance(dest, str) or not isinstance(source, str) or not isinstance(options, list):
            raise RuntimeFailure(f"{config}: mount {shown(dest)} has no destination or source")
        bind = m.get("type") == "bind" or "bind" in options or "rbind" in options
        if bind and dest.startswith("/") and os.path.normpath(dest) not in ENGINE_PLUMBING:
            volumes[os.path.normpath(dest)] = source
    return volumes


def resolve_rootfs(spec: dict, bundle: str, config: str) -> str:
    """The rootfs as an absolute path.

    A relative root.path (containerd's `rootfs`) must stay inside the bundle,
    symlinks resolved: `../../etc` or a planted `rootfs -> /` is refused. An
    absolute one is the engine's own statement and taken as it is: dockerd
    mounts the container itself and points at `<data-root>/overlay2/<id>/merged`.
    """
    root = spec.get("root")
    path = root.get("path") if isinstance(root, dict) else None
    if not isinstance(path, str) or not path:
        raise RuntimeFailure(f"{config}: root.path is missing")
    if os.path.isabs(path):
        rootfs = os.path.normpath(path)
    else:
        real_bundle = os.path.realpath(bundle)
        rootfs = os.path.realpath(os.path.join(real_bundle, path))
        if os.path.commonpath((real_bundle, rootfs)) != real_bundle:
            raise RuntimeFailure(
                f"{config}: root.path {shown(path)} resolves to {rootfs}, outside the bundle {real_bundle}"
            )
    if not os.path.isdir(rootfs):
        raise RuntimeFailure(f"{config}: rootfs {rootfs} is not a directory")
    return rootfs


def engine_labels(engine_root: str, cid: str) -> dict[str, str] | None:
    """Config.Labels from the engine's `containers/<id>/config.v2.json`, None if it has no such file.

    dockerd does not copy a container's labels into the OCI annotations, so
    for it this is where an extension is recognised.
    """
    path = f"{engine_root}/containers/{cid}/config.v2.json"
    if not os.path.lexists(path):
        return None
    doc = read_json(path, "engine record")
    config = doc.get("Config")
    if not isinstance(config, dict):
        raise RuntimeFailure(f"{path}: Config is not an object")
    return string_map(config.get("Labels"), f"{path}: Config.Labels")


def extension_labels(annotations: Mapping[str, str], engine_root: str, cid: str) -> tuple[dict[str, str], str]:
    """(labels, where they came from): the annotations when they carry balena
    labels, else the engine's record of the container, else the annotations."""
    if any(k.startswith("io.balena.") for k in annotations):
        return dict(annotations), "the OCI annotations"
    labels = engine_labels(engine_root, cid)
    if labels is not None:
        return labels, f"{engine_root}/containers/{cid}/config.v2.json"
    return dict(annotations), "the OCI annotations"


def boot_verdict(labels: Mapping[str, str], rootfs: str) -> str | None:
    """What the assembler will say at the next boot: why it would skip this extension."""
    from mobynit.core import cmdline
    from mobynit.core import policy
    from mobynit.core import store

    release = os.uname().release
    try:
        token = cmdline.read().get(policy.CMDLINE_ABI)
    except OSError:
        token = None
    try:
        modules = store.probe_modules([rootfs], release)
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
        layers = store.Store(engine_root).layers(cid)
        facts.index([(layer.id, os.path.dirname(layer.path)) for layer in layers])
    except MobynitError as e:
        return f"cannot record its layer facts ({e}); the next boot will nest its layers"
    except OSError as e:
        return f"cannot record its layer facts ({e.filename}: {e.strerror}); the next boot will nest its layers"
    return None


# --- hooks -------------------------------------------------------------------


def hook_timeout() -> float:
    raw = os.environ.get(HOOK_TIMEOUT_ENV)
    if raw is None:
        return HOOK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{HOOK_TIMEOUT_ENV}={shown(raw)} is not a positive number of seconds")
    return value


def run_hook(path: str, env: Mapping[str, str], log: Log, cwd: str = "/", timeout: float | None = None) -> bool:
    """Run one hook; False when there is none. Raises RuntimeFailure when it fails.

    A missing hook is skipped; one that is not an executable regular file is
    an error (a hook the author meant to ship must not be silently ignored).
    The hook runs in its own process group, with stdin on /dev/null and its
    output on our stderr (the container's stderr during create), and the whole
    group is killed at the timeout.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        log("debug", f"no hook {path}")
        return False
    except OSError as e:
        raise RuntimeFailure(f"hook {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RuntimeFailure(f"hook {path} is not a regular file")
    if not st.st_mode & 0o111:
        raise RuntimeFailure(f"hook {path} is not executable (chmod +x it in the image)")
    limit = hook_timeout() if timeout is None else timeout
    log("info", f"running hook {path}")
    try:
        proc = subprocess.Popen(
            [path],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=2,
            stderr=2,
            start_new_session=True,
        )
    except OSError as e:
        raise RuntimeFailure(f"hook {path} cannot be executed: {e.strerror}") from None
    try:
        status = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        raise RuntimeFailure(f"hook {path} did not finish within {limit:g} s and was killed") from None
    if status < 0:
        raise RuntimeFailure(f"hook {path} was killed by signal {signal.Signals(-status).name}")
    if status:
        raise RuntimeFailure(f"hook {path} failed with exit status {status}")
    log("info", f"hook {path} succeeded")
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the proxy -------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of `pid`, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def spawn_proxy(console_socket: str | None) -> tuple[int, int]:
    """Fork the process containerd tracks; returns (pid, start time).

    The proxy does nothing but wait for a signal: SIGUSR1 (start done),
    SIGTERM or SIGINT make it exit 0; any other signal has its default
    effect, as on any idle process. Those three are blocked before the fork,
    so one sent the moment the pid file exists is queued, never lost.
    When we exit, the proxy is re-parented to the shim (a subreaper), which
    reaps it and reports its exit status to the engine.
    """
    master = slave = -1
    if console_socket is not None:
        master, slave = os.openpty()
        tty_name = os.ttyname(slave)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PROXY_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _proxy(slave)  # never returns
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if console_socket is not None:
        os.close(slave)
        try:
            _send_console(console_socket, master, tty_name)
        except OSError as e:
            os.kill(pid, signal.SIGKILL)
            raise RuntimeFailure(f"cannot hand the terminal to console socket {console_socket}: {e.strerror}") from None
        finally:
            os.close(master)
    st = proc_stat(pid)  # our child until we exit: its /proc entry stays, even as a zombie
    if st is None:
        raise RuntimeFailure(f"proxy process {pid} has no /proc entry right after fork")
    return pid, st[1]


def _proxy(tty: int) -> None:
    try:
        os.setsid()
        if tty >= 0:
            import termios

            fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
        os.closerange(3, 65536)
        os.chdir("/")
        with open("/proc/self/comm", "w") as comm:  # so ps shows what it is
            comm.write("extension-proxy")
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signal.valid_signals()) - PROXY_SIGNALS)
        signal.sigwait(PROXY_SIGNALS)
        os._exit(0)
    finally:
        os._exit(127)


def _send_console(path: str, master: int, name: str) -> None:
    """Pass the terminal's master side to the shim as runc does: its name, and the fd by SCM_RIGHTS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        socket.send_fds(sock, [name.encode()], [master])


# --- state -------------------------------------------------------------------


class State(Record):
    """What the runtime remembers of one container, in `<root>/<id>/state.json`.

    The file is the OCI state (what `state` prints) plus, under "mobynit",
    what later steps need without the bundle: the proxy's start time (so a
    recycled pid is never signalled) and the extension's volumes.
    """

    __slots__ = ("id", "status", "pid", "proxy_start", "bundle", "rootfs", "created", "labels", "volumes")
    id: str
    status: str
    pid: int
    proxy_start: int
    bundle: str
    rootfs: str
    created: str
    labels: dict[str, str]
    volumes: dict[str, str]

    def hook_env(self) -> dict[str, str]:
        return hook_env(self.rootfs, self.labels, self.volumes)

    def proxy_alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[0] not in ("Z", "X", "x") and st[1] == self.proxy_start

    def current_status(self) -> str:
        """`created` while the proxy waits; once it is gone, however it went, `stopped`."""
        if self.status == CREATED and not self.proxy_alive():
            return STOPPED
        return self.status

    def oci(self) -> dict:
        status = self.current_status()
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": status,
            "pid": self.pid if status == CREATED else 0,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": self.labels,
        }

    def to_json(self) -> bytes:
        doc = self.oci()
        doc.update(status=self.status, pid=self.pid)
        doc["mobynit"] = {"proxyStart": self.proxy_start, "volumes": self.volumes}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, path: str) -> State:
        doc = read_json(path, "state file", 1 << 20)
        try:
            private = doc["mobynit"]
            state = cls(
                id=doc["id"],
                status=doc["status"],
                pid=doc["pid"],
                proxy_start=private["proxyStart"],
                bundle=doc["bundle"],
                rootfs=doc["rootfs"],
                created=doc["created"],
                labels=string_map(doc["annotations"], f"state file {path}: annotations"),
                volumes=string_map(private["volumes"], f"state file {path}: volumes"),
            )
        except (KeyError, TypeError) as e:
            raise RuntimeFailure(f"state file {path} lacks field {e}") from None
        numbers = (state.pid, state.proxy_start)
        if state.status not in (CREATED, STOPPED) or not all(type(n) is int for n in numbers):
            raise RuntimeFailure(f"state file {path} has a bad status or pid")
        return state


def valid_id(cid: str) -> str:
    """Container ids become path names: refuse what could leave the root (runc's rule)."""
    if not cid or cid in (".", "..") or not all(c.isascii() and (c.isalnum() or c in "_+-.") for c in cid):
        raise UsageError(f"invalid container id {shown(cid)!r}: only letters, digits and _+-. are allowed")
    return cid


class Container:
    """One container's directory under the runtime root, held under its lock.

    The lock is a file beside the state directory, `<root>/<id>.lock`; delete
    unlinks it while still holding it, so a waiter that then gets the lock
    checks it still holds the file at that path and retries otherwise.
    """

    def __init__(self, root: str, cid: str) -> None:
        self.root = root
        self.id = valid_id(cid)
        self.dir = f"{root}/{cid}"
        self.state_path = f"{self.dir}/state.json"
        self.lock_path = f"{root}/{cid}.lock"
        self.lock_fd = -1

    def __enter__(self) -> Container:
        try:
            os.makedirs(self.root, mode=0o711, exist_ok=True)
        except OSError as e:
            raise RuntimeFailure(f"cannot create the runtime root {self.root}: {e.strerror}") from None
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.lock_fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        """Release the lock; a container with no state (deleted, or never
        created) leaves nothing behind, not even its lock file."""
        try:
            if not self.exists():
                os.unlink(self.lock_path)
        finally:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def exists(self) -> bool:
        return os.path.exists(self.state_path)

    def load(self) -> State:
        if not self.exists():
            raise RuntimeFailure(f"container {self.id} does not exist")
        return State.from_json(self.state_path)

    def save(self, state: State) -> None:
        os.makedirs(self.dir, mode=0o711, exist_ok=True)
        write_atomic(self.state_path, state.to_json())

    def remove(self) -> None:
        """Forget the container: the state file first (the commit point), then its directory."""
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                os.unlink(f"{self.dir}/{name}")  # a crashed write's temp file
            os.rmdir(self.dir)
        fsync_dir(self.root)


# --- the commands --------------------------------------------------------------


class Options(Record):
    """The global options, as runc takes them."""

    __slots__ = ("root", "log", "engine_root")
    root: str
    log: Log
    engine_root: str


def cmd_create(opts: Options, cid: str, bundle: str, pid_file: str, console_socket: str | None) -> None:
    log = opts.log
    bundle = os.path.abspath(bundle)
    config = f"{bundle}/config.json"
    with Container(opts.root, cid) as ctr:
        if ctr.exists():
            raise RuntimeFailure(f"container {cid} already exists")
        spec = read_json(config, "bundle config")
        rootfs = resolve_rootfs(spec, bundle, config)
        annotations = string_map(spec.get("annotations"), f"{config}: annotations")
        labels, source = extension_labels(annotations, opts.engine_root, cid)
        from mobynit.core.policy import is_extension

        if not is_extension(labels):
            raise RuntimeFailure(
                f"container {cid} is not an extension: no {CLASS_LABEL}=overlay (nor the legacy"
                f" {LEGACY_LABEL}=1) in {source}; run it with another runtime"
            )
        volumes = spec_volumes(spec, config)
        verdict = boot_verdict(labels, rootfs)
        if verdict is not None:
            log("warning", f"extension {cid} will be skipped at the next boot: {verdict}")
        problem = index_layers(opts.engine_root, cid)
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
            write_atomic(os.path.abspath(pid_file), f"{pid}".encode())
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            if ctr.exists():
                ctr.remove()
            raise
        log("info", f"created extension {cid} (proxy pid {pid}, labels from {source})")


def cmd_start(opts: Options, cid: str) -> None:
    with Container(opts.root, cid) as ctr:
        state = ctr.load()
        status = state.current_status()
        if status != CREATED:
            raise RuntimeFailure(f"cannot start container {cid}: it is {status}, not created")
        run_hook(f"{state.rootfs}/hooks/start", state.hook_env(), opts.log, cwd=_cwd(state.rootfs))
        ctr.save(state.replace(status=STOPPED))
        _signal_proxy(state, signal.SIGUSR1)
        opts.log("info", f"started extension {cid}: it is installed and stopped")


def cmd_kill(opts: Options, cid: str, sig: int) -> None:
    with Container(opts.root, cid) as ctr:
        state = ctr.load()
        if not state.proxy_alive():
            raise RuntimeFailure(f"cannot kill container {cid}: container not running")
        _signal_proxy(state, sig)
        if state.status != STOPPED:
            ctr.save(state.replace(status=STOPPED))
        opts.log("info", f"sent {signal.Signals(sig).name} to extension {cid}")


def cmd_delete(opts: Options, cid: str, force: bool) -> None:
    """Refuses a created container unless forced; --force also forgets the
    container when its delete hook fails (and still reports the failure)."""
    with Container(opts.root, cid) as ctr:
        if force and not ctr.exists():
            ctr.remove()
            return
        state = ctr.load()
        status = state.current_status()
        if status != STOPPED and not force:
            raise RuntimeFailure(f"cannot delete container {cid}: it is {status} (use --force)")
        if state.proxy_alive():
            _signal_proxy(state, signal.SIGKILL)
        try:
            run_hook(f"{state.rootfs}/hooks/delete", state.hook_env(), opts.log, cwd=_cwd(state.rootfs))
        except RuntimeFailure:
            if force:
                ctr.remove()
                opts.log("warning", f"forgot extension {cid} although its delete hook failed")
            raise
        ctr.remove()
        opts.log("info", f"deleted extension {cid}")


def _cwd(rootfs: str) -> str:
    """The hook's working directory: the rootfs, or / once the engine unmounted it."""
    return rootfs if os.path.isdir(rootfs) else "/"


def cmd_state(opts: Options, cid: str) -> None:
    with Container(opts.root, cid) as ctr:
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
        sys.stdout.write(f"{PROG} version {VERSION}\nspec: {OCI_VERSION}\n")
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
