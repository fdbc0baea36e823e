"""Drive a private instance of Debian's dockerd for tests and image builds.

Each Engine owns a data-root (which is the store the tests read, exactly as
balena's image build writes it) and a short private directory under /run for
its socket, exec-root (containerd's sockets and state live there) and pidfile,
so several engines run side by side without touching /run/containerd,
/var/run/docker.sock or each other. AF_UNIX paths are limited to 108 bytes,
hence the short names.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.harness import mounts
from mobynit.runtime.engine import UnixConnection

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's client; /usr/local/bin/docker is another one

PRIVATE_PREFIX = "mh"  # /run/mhXXXXXXXX: short, for the 108-byte AF_UNIX path limit
_PR_SET_PDEATHSIG = 1
_live: set["Engine"] = set()


class EngineError(RuntimeError):
    """dockerd or a docker command failed; the message carries its output."""


def _die_with_parent() -> None:
    # If the test process is killed outright, dockerd gets SIGTERM and shuts
    # its containerd down instead of outliving the session.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


FileData = bytes | str


class Engine:
    """A running dockerd with its own data-root; use as a context manager.

    `extra_args` go to dockerd verbatim, e.g. ("--add-runtime", "extension=/path").
    Mounts the engine makes live in the mount namespace it was started from, or
    with own_namespace=True in a private one of its own (via unshare(1)), which
    nothing outside sees and which vanishes with dockerd and its children: the
    safe choice for scripts that build devices outside the test suite's
    namespace. Either way stop() goes into that namespace to clean up.
    """

    def __init__(
        self,
        data_root: str | os.PathLike[str],
        extra_args: Iterable[str] = (),
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        own_namespace: bool = False,
    ) -> None:
        self.data_root = Path(data_root).absolute()
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.own_namespace = own_namespace
        self.private_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._ns_fd = -1
        self._log_file: Any = None
        self._terminated = False
        self.last_log = ""  # dockerd's whole log, kept by stop() when its private dir goes

    # --- paths -------------------------------------------------------------

    def _private(self, name: str) -> Path:
        if self.private_dir is None:
            raise EngineError("engine is not started")
        return self.private_dir / name

    @property
    def socket_path(self) -> Path:
        return self._private("s")

    @property
    def exec_root(self) -> Path:
        return self._private("x")

    @property
    def pidfile(self) -> Path:
        return self._private("p")

    @property
    def log_path(self) -> Path:
        return self._private("log")

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    @property
    def host(self) -> str:
        """The DOCKER_HOST value for clients."""
        return f"unix://{self.socket_path}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for /usr/bin/docker against this engine (classic builder, private config)."""
        env = dict(os.environ)
        env.update(
            DOCKER_HOST=self.host,
            DOCKER_BUILDKIT="0",
            DOCKER_CONFIG=str(self._private("cfg")),
        )
        env.pop("DOCKER_CONTEXT", None)
        env.pop("DOCKER_TLS_VERIFY", None)
        return env

    # --- life cycle --------------------------------------------------------

    def start(self, wait: bool = True) -> "Engine":
        """Launch dockerd; with wait=False call wait_ready() later (to start engines in parallel)."""
        if self.process is not None:
            raise EngineError("engine already started")
        self.data_root.mkdir(parents=True, exist_ok=True)
        base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
        _remove_stale_private_dirs(base)
        self.private_dir = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=base))
        self._private("cfg").mkdir()
        config = self._private("daemon.json")
        # Our own config, never /etc/docker/daemon.json, and our own trust key:
        # engines starting together on a fresh machine would otherwise race to
        # create /etc/docker/key.json, one reading it half-written.
        config.write_text(json.dumps({"deprecated-key-path": str(self._private("key.json"))}) + "\n")
        wrapper = ["/usr/bin/unshare", "--mount", "--propagation", "private", "--"] if self.own_namespace else []
        cmd = [
            *wrapper,
            DOCKERD,
            "--config-file", str(config),
            "--data-root", str(self.data_root),
            "-s", "overlay2",
            "-H", self.host,
            "--pidfile", str(self.pidfile),
            "--exec-root", str(self.exec_root),
            "--iptables=false",
            "--bridge=none",
            *self.extra_args,
        ]
        if not self.own_namespace:
            self._ns_fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        _live.add(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Poll /_ping until dockerd answers; on failure stop it and raise with its log tail."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        if self.process is None:
            raise EngineError("engine is not started")
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(
                    f"dockerd exited with status {self.process.returncode} while starting "
                    f"(data-root {self.data_root}); last log lines:\n{self.log_tail()}"
                )
            try:
                status, body = self._request("GET", "/_ping", None, timeout=2.0)
                if status == 200 and body.strip() == b"OK":
                    if self._ns_fd < 0:  # dockerd answers: it is in its own namespace by now
                        self._ns_fd = os.open(f"/proc/{self.process.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                    return
                last_error = f"/_ping answered {status} {body[:80]!r}"
            except OSError as e:
                last_error = str(e)
            time.sleep(0.05)
        raise EngineError(
            f"dockerd did not answer /_ping within {self.start_timeout:.0f} s ({last_error}); "
            f"last log lines:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, EngineError):
            text = self.last_log or "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _own_processes(self) -> list[int]:
        """Pids whose command line names our private dir: containerd, shims."""
        if self.private_dir is None:
            return []
        needle = str(self.private_dir).encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    def request_stop(self, kill_containers: bool = True) -> None:
        """Send dockerd its SIGTERM now; stop() then only waits (to stop engines in parallel).

        With kill_containers, running containers are killed through the API
        first: dockerd would otherwise give each one its 10 s stop timeout.
        """
        if self.process is None or self.process.poll() is not None or self._terminated:
            return
        if kill_containers:
            try:
                for c in self.api("GET", "/containers/json", timeout=5) or []:
                    self.api("POST", f"/containers/{c['Id']}/kill", timeout=10)
            except (EngineError, OSError, ValueError, KeyError, TypeError):
                pass  # best effort: dockerd's own shutdown still stops them
        self.process.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self, kill_containers: bool = True) -> None:
        """SIGTERM dockerd, SIGKILL after stop_timeout, reap containerd, unmount leftovers."""
        self.request_stop(kill_containers)
        proc, self.process = self.process, None
        self._terminated = False
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._reap_children()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._ns_fd >= 0:
            self._unmount_leftovers()
            os.close(self._ns_fd)
            self._ns_fd = -1
        if self.private_dir is not None:
            try:
                self.last_log = self.log_path.read_text(errors="replace")
            except OSError:
                pass
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None
        _live.discard(self)

    def _reap_children(self) -> None:
        deadline = time.monotonic() + 10
        pids = self._own_processes()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if _alive(p)]
        for pid in pids:
            _signal(pid, signal.SIGKILL)

    def _unmount_leftovers(self) -> None:
        prefixes = [str(self.data_root)]
        if self.private_dir is not None:
            prefixes.append(str(self.private_dir))
        if _same_ns(self._ns_fd):
            mounts.unmount_under(*prefixes)
        else:
            with mounts.NamespaceVisit(self._ns_fd):
                mounts.unmount_under(*prefixes)

    def __enter__(self) -> "Engine":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- clients -----------------------------------------------------------

    def docker(self, *args: str, input: FileData | None = None, check: bool = True, timeout: float = 300) -> str:
        """Run /usr/bin/docker against this engine and return its stdout."""
        data = input.encode() if isinstance(input, str) else input
        try:
            res = subprocess.run(
                [DOCKER, *args], input=data, capture_output=True, env=self.env, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise EngineError(f"docker {' '.join(args)}: no answer within {timeout:.0f} s") from e
        if check and res.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} failed with status {res.returncode}: "
                f"{res.stderr.decode(errors='replace').strip()}"
            )
        return res.stdout.decode(errors="replace")

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        conn = UnixConnection(str(self.socket_path), timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> Any:
        """One Engine API call with a JSON body; returns the decoded JSON answer (or None).

        `path` is e.g. "/containers/json?all=1" (unversioned: the engine's own API version).
        """
        payload = None if body is None else json.dumps(body).encode()
        try:
            status, data = self._request(method, path, payload, timeout)
        except OSError as e:
            raise EngineError(f"{method} {path}: {e}") from e
        if status >= 400:
            raise EngineError(f"{method} {path} answered {status}: {data.decode(errors='replace').strip()}")
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data.decode(errors="replace")

    # --- images and containers ----------------------------------------------

    def import_tree(self, tree_dir: str | os.PathLike[str], tag: str, labels: Mapping[str, str] | None = None) -> str:
        """`tar -C tree -c . | docker import - tag`: a one-layer image; returns its id."""
        changes: list[str] = []
        for key, value in (labels or {}).items():
            changes += ["--change", f"LABEL {json.dumps(key)}={json.dumps(value)}"]
        tar = subprocess.Popen(
            ["tar", "-C", str(tree_dir), "--numeric-owner", "--xattrs", "-c", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert tar.stdout is not None
        try:
            res = subprocess.run(
                [DOCKER, "import", *changes, "-", tag],
                stdin=tar.stdout,
                capture_output=True,
                env=self.env,
                timeout=300,
            )
        finally:
            tar.stdout.close()
            tar_err = tar.stderr.read() if tar.stderr else b""
            tar.wait()
        if tar.returncode != 0:
            raise EngineError(f"tar of {tree_dir} failed: {tar_err.decode(errors='replace').strip()}")
        if res.returncode != 0:
            raise EngineError(f"docker import {tag} failed: {res.stderr.decode(errors='replace').strip()}")
        return res.stdout.decode().strip()

    def build(self, tag: str, dockerfile: str, files: Mapping[str, Any] | None = None) -> str:
        """`docker build` (classic builder) from a context made of `files`; returns the image id.

        The context lives in a temporary directory outside the data-root:
        the engine refuses a context that contains its own store. `files`
        values are whatever harness.rootfs.write_files accepts.
        """
        return self.build_many([(tag, dockerfile, files)])[0]

    def build_many(
        self, builds: Iterable[tuple[str, str, Mapping[str, Any] | None]], parallel: int = 4
    ) -> list[str]:
        """Several `docker build`s, up to `parallel` client processes at once; image ids in order.

        (tag, dockerfile, files) as for build(). Processes, not threads: the test
        process must stay single-threaded for unshare(CLONE_NEWNS).
        """
        from tests.harness.rootfs import write_files

        todo = list(enumerate(builds))
        results: dict[int, str] = {}
        running: list[tuple[int, str, subprocess.Popen[bytes], Any, Any]] = []
        with tempfile.TemporaryDirectory(prefix="mh-ctx-") as top:
            try:
                while todo or running:
                    while todo and len(running) < max(1, parallel):
                        n, (tag, dockerfile, files) = todo.pop(0)
                        ctx = Path(top) / str(n)
                        ctx.mkdir()
                        write_files(ctx, dict(files or {}))
                        (ctx / "Dockerfile").write_text(dockerfile)
                        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                        proc = subprocess.Popen(
                            [DOCKER, "build", "-q", "--network", "none", "-t", tag, str(ctx)],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env,
                        )
                        running.append((n, tag, proc, out, err))
                    n, tag, proc, out, err = running[0]
                    try:
                        proc.wait(timeout=0.02 if len(running) > 1 else 300)
                    except subprocess.TimeoutExpired:
                        running.append(running.pop(0))  # look at the next one
                        continue
                    running.pop(0)
                    out.seek(0)
                    err.seek(0)
                    stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
                    out.close()
                    err.close()
                    if proc.returncode != 0:
                        raise EngineError(f"docker build {tag} failed with status {proc.returncode}: {stderr.strip()}")
                    results[n] = stdout.strip().splitlines()[-1]
            finally:
                for _, _, proc, out, err in running:
                    proc.kill()
                    proc.wait()
                    out.close()
                    err.close()
        return [results[n] for n in sorted(results)]

    def load(self, archive: bytes) -> str:
        """`docker load` of an image archive; returns the engine's output."""
        return self.docker("load", input=archive).strip()

    def create(
        self, image: str, name: str, cmd: Iterable[str] = ("/bin/true",), *, options: Iterable[str] = ()
    ) -> str:
        """`docker create --name NAME [options] IMAGE CMD`; returns the container id.

        e.g. options=("--runtime", "extension") for an engine started with --add-runtime.
        """
        return self.docker("create", "--name", name, *options, image, *cmd).strip()

    def create_many(
        self, image: str, names: Iterable[str], cmd: Iterable[str] = ("/bin/true",), *, parallel: int = 8
    ) -> list[str]:
        """Create containers through the API, `parallel` requests in flight; ids in order.

        Requests go out on separate connections before any answer is read, so
        dockerd works on them concurrently while this process stays single-threaded.
        """
        body = json.dumps({"Image": image, "Cmd": list(cmd)}).encode()
        names = list(names)
        ids: list[str] = []
        for at in range(0, len(names), max(1, parallel)):
            batch = names[at : at + max(1, parallel)]
            conns = []
            try:
                for name in batch:
                    conn = UnixConnection(str(self.socket_path), 60.0)
                    conns.append(conn)
                    query = urllib.parse.urlencode({"name": name})
                    conn.request("POST", f"/containers/create?{query}", body=body,
                                 headers={"Content-Type": "application/json"})
                for name, conn in zip(batch, conns):
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status >= 400:
                        answer = data.decode(errors="replace").strip()
                        raise EngineError(f"creating container {name}: {resp.status} {answer}")
                    ids.append(json.loads(data)["Id"])
            except OSError as e:
                raise EngineError(f"creating containers from {image}: {e}") from e
            finally:
                for conn in conns:
                    conn.close()
        return ids

    def inspect(self, ref: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", ref))[0]


def _remove_stale_private_dirs(base: str, min_age: float = 300.0) -> None:
    """Remove private dirs of engines killed outright (no cleanup ran): old, with
    our daemon.json, and named by no live process's command line."""
    try:
        candidates = [e for e in os.scandir(base) if e.name.startswith(PRIVATE_PREFIX) and e.is_dir()]
    except OSError:
        return
    now = time.time()
    stale = []
    for entry in candidates:
        try:
            old = now - entry.stat().st_mtime > min_age
        except OSError:
            continue
        if old and os.path.exists(os.path.join(entry.path, "daemon.json")):
            stale.append(entry.path)
    if not stale:
        return
    in_use = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            in_use.update(d for d in stale if d.encode() in cmdline)
    for d in stale:
        if d not in in_use:
            shutil.rmtree(d, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


def _same_ns(fd: int) -> bool:
    a = os.fstat(fd)
    b = os.stat("/proc/self/ns/mnt")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@atexit.register
def _stop_all() -> None:
    """Backstop: no engine outlives the Python process that started it."""
    for engine in list(_live):
        try:
            engine.stop()
        except Exception:
            pass
