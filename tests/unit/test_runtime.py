"""The extension runtime without an engine: its CLI driven the way containerd's shim drives runc.

Every call runs the real `python -m mobynit.runtime.cli` in a child process, and
the test process plays the shim: it is a child subreaper while a test runs,
so the proxy the runtime forks becomes its child and its exit status can be
checked exactly as the shim reports it to the engine.
"""

from __future__ import annotations

import ctypes
import json
import os
import posix
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from mobynit.core import fileio
from mobynit.core.errors import StoreError, UsageError
from mobynit.runtime import OCI_VERSION, RuntimeFailure, cli, commands, hooks, proxy, spec

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def reaper() -> Iterator[None]:
    """Adopt the proxies our runtime children fork, like the shim does; reap what is left after."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = set(_children())
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in set(_children()) - before:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _children(comm: str | None = None) -> list[int]:
    """Our child processes (by /proc), optionally only those named `comm`."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode()
            if stat[stat.rindex(b")") + 2 :].split()[1].decode() == me and comm in (None, name):
                found.append(int(entry))
    return sorted(found)


def proxies() -> list[int]:
    return _children("extension-proxy")


def exit_status(pid: int) -> int:
    """Wait for an adopted proxy and return its exit status as the engine shows it (128+n for a signal)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


class Rt:
    """One runtime root with its log, and a way to call the runtime CLI."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "state"
        self.log = tmp / "log.json"
        self.engine_root = tmp / "engine"
        self.env = dict(os.environ, **{cli.ENGINE_ROOT_ENV: str(self.engine_root)})

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mobynit.runtime.cli", "--root", str(self.root), "--log", str(self.log),
                "--log-format", "json", *args]

    def __call__(self, *args: str, check: bool = True, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = run_files(self.argv(*args), env or self.env)
        assert "Traceback" not in proc.stderr, proc.stderr
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def fail(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Run a call that must fail; returns its message, checked against the log's last error."""
        proc = self(*args, check=False, env=env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        message = proc.stderr.strip()
        assert message.startswith("mobynit-runtime: ")
        assert self.errors()[-1] == message.removeprefix("mobynit-runtime: ").splitlines()[0]
        return message

    def errors(self) -> list[str]:
        return [e["msg"] for e in self.entries() if e["level"] == "error"]

    def entries(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def state(self, cid: str) -> dict:
        return json.loads(self("state", cid).stdout)


def run_files(argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run with stdout and stderr in files, as the shim passes them (tests/unit/test_runtime_compat.py
    reads them through pipes, as a shell's $(...) does)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rc = subprocess.run(argv, stdout=out, stderr=err, env=env, timeout=120).returncode
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, rc, out.read(), err.read())


class Spawned:
    """A runtime call started in the background, its output in files."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.err, env=env)

    def result(self) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=120)
        self.out.seek(0)
        self.err.seek(0)
        return rc, self.out.read(), self.err.read()


def hook(body: str) -> str:
    return f"#!/bin/sh\n{body}\n"


class Bundle:
    """An OCI bundle whose rootfs ships hooks that leave evidence in `evidence`."""

    def __init__(self, tmp: Path, name: str = "bundle", labels: Mapping[str, str] | None = None,
                 hooks: Mapping[str, str] | None = None, mounts: list | None = None, root_path: str = "rootfs") -> None:
        self.path = tmp / name
        self.rootfs = self.path / "rootfs"
        self.evidence = tmp / f"{name}.evidence"
        (self.rootfs / "hooks").mkdir(parents=True)
        labels = {"io.balena.image.class": "overlay"} if labels is None else labels
        spec = {"ociVersion": "1.0.2", "root": {"path": root_path}, "annotations": dict(labels),
                "mounts": mounts or [], "process": {"args": ["/bin/true"], "cwd": "/"}}
        self.config = self.path / "config.json"
        self.config.write_text(json.dumps(spec))
        if hooks is None:
            hooks = {step: hook(f'echo {step} >> "{self.evidence}"') for step in ("create", "start", "delete")}
        for step, text in hooks.items():
            self.set_hook(step, text)

    def set_hook(self, step: str, text: str, mode: int = 0o755) -> None:
        path = self.rootfs / "hooks" / step
        path.write_text(text)
        path.chmod(mode)

    def steps(self) -> list[str]:
        return self.evidence.read_text().split() if self.evidence.exists() else []


@pytest.fixture
def rt(tmp_path: Path, reaper: None) -> Rt:
    return Rt(tmp_path)


def create(rt: Rt, bundle: Bundle, cid: str = "ext1") -> int:
    pid_file = rt.tmp / f"{cid}.pid"
    rt("create", "--bundle", str(bundle.path), "--pid-file", str(pid_file), cid)
    return int(pid_file.read_text())


def leftovers(rt: Rt) -> list[str]:
    return sorted(os.listdir(rt.root)) if rt.root.exists() else []


# --- the life cycle ------------------------------------------------------------------------------


def test_create_start_delete_runs_hooks_in_order_and_proxy_exits_0(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid = create(rt, b)
    state = rt.state("ext1")
    assert (state["status"], state["pid"], state["id"]) == ("created", pid, "ext1")
    assert state["rootfs"] == str(b.rootfs) and state["bundle"] == str(b.path)
    assert state["annotations"] == {"io.balena.image.class": "overlay"}
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "extension-proxy"
    assert b.steps() == ["create"]

    rt("start", "ext1")
    assert exit_status(pid) == 0  # the engine shows "Exited (0)"
    assert rt.state("ext1")["status"] == "stopped"
    assert b.steps() == ["create", "start"]

    rt("delete", "ext1")
    assert b.steps() == ["create", "start", "delete"]
    assert "does not exist" in rt.fail("state", "ext1")
    rt("delete", "--force", "ext1")  # the shim follows up with a forced delete: a no-op
    assert leftovers(rt) == []


def test_state_rules(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid = create(rt, b)
    assert "already exists" in rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "p2"), "ext1")
    assert "it is created (use --force)" in rt.fail("delete", "ext1")
    rt("start", "ext1")
    assert exit_status(pid) == 0
    assert "it is stopped, not created" in rt.fail("start", "ext1")
    assert "container not running" in rt.fail("kill", "ext1", "HUP")
    rt("kill", "ext1", "TERM")  # asks for it to be stopped: it is, so that succeeds
    rt("kill", "ext1", "9")
    assert b.steps() == ["create", "start"]
    rt("delete", "ext1")
    for call in (("start", "ext1"), ("kill", "ext1"), ("delete", "ext1"), ("state", "ext1")):
        assert "container ext1 does not exist" in rt.fail(*call)
    assert leftovers(rt) == []


@pytest.mark.parametrize(("sig", "status"), [("TERM", 0), ("SIGINT", 0), ("9", 137), ("SIGHUP", 129), ("usr1", 0)])
def test_kill_signals_the_proxy_by_name_or_number(rt: Rt, tmp_path: Path, sig: str, status: int) -> None:
    b = Bundle(tmp_path)
    pid = create(rt, b)
    rt("kill", "ext1", sig)
    assert exit_status(pid) == status
    assert rt.state("ext1")["status"] == "stopped"
    rt("delete", "ext1")
    assert b.steps() == ["create", "delete"]


def test_kill_defaults_to_sigterm_and_accepts_all(rt: Rt, tmp_path: Path) -> None:
    pid = create(rt, Bundle(tmp_path))
    rt("kill", "--all", "ext1")
    assert exit_status(pid) == 0
    assert "unknown signal 'SIGNOPE'" in rt.fail("kill", "ext1", "SIGNOPE")


def test_forced_delete_of_created_container_kills_proxy_and_runs_delete_hook(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid = create(rt, b)
    rt("delete", "--force", "ext1")
    assert exit_status(pid) == 137
    assert b.steps() == ["create", "delete"]
    assert leftovers(rt) == []


def test_proxy_that_died_counts_as_stopped(rt: Rt, tmp_path: Path) -> None:
    pid = create(rt, Bundle(tmp_path))
    os.kill(pid, signal.SIGKILL)
    assert exit_status(pid) == 137
    assert rt.state("ext1")["status"] == "stopped"
    assert "it is stopped, not created" in rt.fail("start", "ext1")
    rt("delete", "ext1")


def test_pid_reuse_is_not_mistaken_for_the_proxy(rt: Rt, tmp_path: Path) -> None:
    """The state records the proxy's start time: another process with its pid is not signalled."""
    pid = create(rt, Bundle(tmp_path))
    path = rt.root / "ext1" / "state.json"
    doc = json.loads(path.read_text())
    other = subprocess.Popen(["sleep", "60"])
    try:
        doc["pid"] = other.pid  # as if the proxy died and its pid went to `sleep`
        path.write_text(json.dumps(doc))
        assert rt.state("ext1")["status"] == "stopped"
        assert "container not running" in rt.fail("kill", "ext1", "HUP")
        rt("kill", "ext1", "KILL")  # the container is stopped, as asked: `other` is not signalled
        rt("delete", "ext1")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        os.kill(pid, signal.SIGKILL)
        exit_status(pid)


# --- what create accepts ----------------------------------------------------------------------------


def test_create_rejects_a_container_without_extension_labels(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path, labels={"io.balena.image.kernel-version": "6.1.0"})
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")
    assert "container ext1 is not an extension: missing required label io.balena.image.class" in msg
    assert b.steps() == [] and not (tmp_path / "pid").exists()
    assert leftovers(rt) == []


def test_create_accepts_the_legacy_label(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path, labels={"io.balena.features.host-extension": "1"})
    pid = create(rt, b)
    rt("delete", "--force", "ext1")
    assert exit_status(pid) == 137
    assert b.steps() == ["create", "delete"]


def test_labels_come_from_the_engine_store_when_not_annotated(rt: Rt, tmp_path: Path) -> None:
    cid = "a" * 64
    record = rt.engine_root / "containers" / cid / "config.v2.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"ID": cid, "Config": {"Labels": {"io.balena.image.class": "overlay",
                                                                   "io.balena.image.os-version": "2.*"}}}))
    b = Bundle(tmp_path, labels={"org.opencontainers.image.title": "x"},
               hooks={"create": hook(f'echo "$EXTENSION_IMAGE_OS_VERSION" > "{tmp_path}/os"')})
    pid = create(rt, b, cid)
    assert (tmp_path / "os").read_text() == "2.*\n"
    assert rt.state(cid)["annotations"]["io.balena.image.os-version"] == "2.*"
    assert any("labels from " + str(record) in e["msg"] for e in rt.entries())
    rt("delete", "--force", cid)
    exit_status(pid)

    record.write_text("{not json")
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), cid)
    assert f"engine record {record} is not valid JSON" in msg
    record.unlink()
    record.symlink_to("/etc/hostname")  # never followed
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), cid)
    assert f"engine record {record}: cannot open: Too many levels of symbolic links" in msg


@pytest.mark.parametrize("root_path", ["../elsewhere", "rootfs/../../elsewhere", "link", "link/hooks"])
def test_create_rejects_a_rootfs_outside_the_bundle(rt: Rt, tmp_path: Path, root_path: str) -> None:
    (tmp_path / "elsewhere" / "hooks").mkdir(parents=True)
    b = Bundle(tmp_path, root_path=root_path)
    (b.path / "link").symlink_to(tmp_path / "elsewhere")
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")
    assert "outside the bundle" in msg and str(b.config) in msg
    assert leftovers(rt) == []


def test_an_absolute_rootfs_is_the_engines_word(rt: Rt, tmp_path: Path) -> None:
    """dockerd mounts the container itself and names `<data-root>/overlay2/<id>/merged`."""
    elsewhere = Bundle(tmp_path, "merged")
    b = Bundle(tmp_path, root_path=str(elsewhere.rootfs), hooks={})
    pid = create(rt, b)
    assert rt.state("ext1")["rootfs"] == str(elsewhere.rootfs)
    assert elsewhere.steps() == ["create"]  # the hooks are those of the rootfs named
    rt("delete", "--force", "ext1")
    assert exit_status(pid) == 137
    b.config.write_text(json.dumps({"root": {"path": str(tmp_path / "nowhere")}, "annotations": {}}))
    assert f"rootfs {tmp_path / 'nowhere'} is not a directory" in rt.fail(
        "create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")


def test_create_names_a_broken_bundle(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    b.config.write_text("[1, 2")
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")
    assert f"bundle config {b.config} is not valid JSON" in msg
    b.config.unlink()
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")
    assert f"bundle config {b.config}: missing" in msg
    b.config.write_text(json.dumps({"root": {"path": "rootfs"}, "annotations": {"io.balena.image.class": 1}}))
    assert "annotations is not a map of strings" in rt.fail(
        "create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")


def test_create_warns_when_the_next_boot_would_skip_the_extension(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path, labels={"io.balena.image.class": "overlay", "io.balena.image.kernel-version": "1.2.3"})
    pid = create(rt, b)
    warnings = [e["msg"] for e in rt.entries() if e["level"] == "warning"]
    running = os.uname().release.partition("-")[0]
    assert warnings == [f"extension ext1 will be skipped at the next boot: built for kernel 1.2.3, running kernel is {running}"]
    rt("delete", "--force", "ext1")
    exit_status(pid)

    b2 = Bundle(tmp_path, "fits", labels={"io.balena.image.class": "overlay", "io.balena.image.kernel-version": running})
    pid = create(rt, b2, "ext2")
    assert [e["msg"] for e in rt.entries() if e["level"] == "warning"] == warnings  # no new warning
    rt("delete", "--force", "ext2")
    exit_status(pid)


def test_create_warns_about_modules_without_symvers(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    (b.rootfs / "lib" / "modules" / os.uname().release).mkdir(parents=True)
    pid = create(rt, b)
    assert any("skipped at the next boot" in e["msg"] and "without a Module.symvers" in e["msg"]
               for e in rt.entries() if e["level"] == "warning")
    rt("delete", "--force", "ext1")
    exit_status(pid)


# --- hooks -----------------------------------------------------------------------------------------------


def test_hooks_get_a_clean_environment(rt: Rt, tmp_path: Path) -> None:
    dump = f'#!{sys.executable}\nimport json, os, sys\njson.dump(dict(os.environ), open("{tmp_path}/env." + sys.argv[0].rsplit("/", 1)[1], "w"))\n'
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts = [
        {"destination": "/data/my-vol", "type": "bind", "source": str(vol), "options": ["rbind", "rw"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind"]},
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/boot", "source": "/srv/boot", "options": ["bind", "ro"]},
    ]
    labels = {"io.balena.image.class": "overlay", "io.balena.image.kernel-abi-id": "abc",
              "io.balena.image.requires-reboot": "1", "io.balena.features.host-extension": "1", "other.label": "x"}
    b = Bundle(tmp_path, labels=labels, mounts=mounts, hooks={"create": dump, "start": dump, "delete": dump})
    env = dict(rt.env, SECRET_TOKEN="leak", PATH="/evil:" + os.environ["PATH"])
    pid_file = tmp_path / "pid"
    rt("create", "--bundle", str(b.path), "--pid-file", str(pid_file), "ext1", env=env)
    rt("start", "ext1", env=env)
    assert exit_status(int(pid_file.read_text())) == 0
    rt("delete", "ext1", env=env)
    expected = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "EXTENSION_ROOTFS": str(b.rootfs),
        "EXTENSION_IMAGE_CLASS": "overlay",
        "EXTENSION_IMAGE_KERNEL_ABI_ID": "abc",
        "EXTENSION_IMAGE_REQUIRES_REBOOT": "1",
        "EXTENSION_VOLUME_DATA_MY_VOL": str(vol),
        "EXTENSION_VOLUME_BOOT": "/srv/boot",
        "EXTENSION_VOLUME_ETC_HOSTS": "/etc/hosts",  # every mount, as the Go tool passes them
        "EXTENSION_VOLUME_PROC": "proc",
    }
    for step in ("create", "start", "delete"):
        seen = json.loads((tmp_path / f"env.{step}").read_text())
        seen.pop("LC_CTYPE", None)  # Python may coerce the C locale for itself
        assert seen == expected, step


def test_env_name_rules() -> None:
    """The Go tool's names (only `-` and `/` become `_`), and a portable one beside a name no shell can read."""
    env = hooks.hook_env("/r", {"io.balena.image.kernel-abi-id": "1", "io.balena.image.x.y": "2",
                                  "io.balena.image.": "skip", "io.balena.service-name": "no"},
                           {"/data/my-vol": "/v", "/": "/root-skip", "/a.b": "/ab", "/x=y": "/xy", "relative": "no"})
    assert env == {"PATH": hooks.HOOK_PATH, "EXTENSION_ROOTFS": "/r", "EXTENSION_IMAGE_KERNEL_ABI_ID": "1",
                   "EXTENSION_IMAGE_X.Y": "2", "EXTENSION_IMAGE_X_Y": "2", "EXTENSION_VOLUME_DATA_MY_VOL": "/v",
                   "EXTENSION_VOLUME_A.B": "/ab", "EXTENSION_VOLUME_A_B": "/ab", "EXTENSION_VOLUME_X_Y": "/xy"}
    assert hooks.hook_env(None, {}, {}) == {"PATH": hooks.HOOK_PATH}


def test_missing_hooks_are_skipped(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path, hooks={})
    pid = create(rt, b)
    rt("start", "ext1")
    assert exit_status(pid) == 0
    rt("delete", "ext1")
    assert leftovers(rt) == []


def test_a_hook_that_is_not_executable_fails_create(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    b.set_hook("create", hook("true"), mode=0o644)
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")
    assert f"hook {b.rootfs}/hooks/create is not executable" in msg
    assert leftovers(rt) == [] and not (tmp_path / "pid").exists()
    (b.rootfs / "hooks" / "create").unlink()
    (b.rootfs / "hooks" / "create").mkdir()
    assert "is not a regular file" in rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1")


def test_a_failing_create_hook_leaves_nothing(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    b.set_hook("create", hook("echo partial >&2; exit 3"))
    proc = rt("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1", check=False)
    assert proc.returncode == 1
    assert "partial" in proc.stderr  # the hook's output reaches the caller (the container's stderr)
    assert rt.errors()[-1] == f"hook {b.rootfs}/hooks/create failed with exit status 3"
    assert leftovers(rt) == [] and not (tmp_path / "pid").exists()
    assert proxies() == []  # no proxy was left behind


def test_a_failing_start_hook_leaves_the_state_unchanged(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid = create(rt, b)
    before = (rt.root / "ext1" / "state.json").read_bytes()
    b.set_hook("start", hook("exit 1"))
    assert f"hook {b.rootfs}/hooks/start failed with exit status 1" in rt.fail("start", "ext1")
    assert (rt.root / "ext1" / "state.json").read_bytes() == before
    assert rt.state("ext1")["status"] == "created"
    b.set_hook("start", hook(f'echo start >> "{b.evidence}"'))  # fixed: containerd may retry
    rt("start", "ext1")
    assert exit_status(pid) == 0
    rt("delete", "ext1")
    assert b.steps() == ["create", "start", "delete"]


def test_a_failing_delete_hook_keeps_the_state_unless_forced(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid = create(rt, b)
    rt("kill", "ext1", "KILL")
    assert exit_status(pid) == 137
    b.set_hook("delete", hook("exit 7"))
    before = (rt.root / "ext1" / "state.json").read_bytes()
    assert "failed with exit status 7" in rt.fail("delete", "ext1")
    assert (rt.root / "ext1" / "state.json").read_bytes() == before
    assert "failed with exit status 7" in rt.fail("delete", "--force", "ext1")
    assert leftovers(rt) == []  # force forgets it all the same


def test_a_hook_that_hangs_is_killed_with_its_children(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    marker = tmp_path / "grandchild"
    # $$ is the pid in the hook's own PID namespace; /proc/self (host's /proc) gives the real one.
    b.set_hook("create", hook(f'sh -c \'read p _ < /proc/self/stat; echo $p > "{marker}"; exec sleep 600\' & wait'))
    env = dict(rt.env, **{hooks.HOOK_TIMEOUT_ENV: "1"})
    msg = rt.fail("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1", env=env)
    assert f"hook {b.rootfs}/hooks/create did not finish within 1 s and was killed" in msg
    grandchild = int(marker.read_text())
    assert proxy.proc_stat(grandchild) is None or proxy.proc_stat(grandchild)[0] == "Z"
    assert leftovers(rt) == []
    bad = dict(rt.env, **{hooks.HOOK_TIMEOUT_ENV: "soon"})
    assert "MOBYNIT_RUNTIME_HOOK_TIMEOUT=soon is not a positive number" in rt.fail(
        "create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "ext1", env=bad)


# --- state file and locking ---------------------------------------------------------------------------------


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    fileio.write_atomic(str(path), b"old\n")
    assert path.read_bytes() == b"old\n" and os.listdir(tmp_path) == ["state.json"]

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(posix, "fsync", crash)  # what fileio calls
    with pytest.raises(StoreError, match="No space left on device"):
        fileio.write_atomic(str(path), b"new\n")
    assert path.read_bytes() == b"old\n" and os.listdir(tmp_path) == ["state.json"]


def test_corrupt_state_is_named_not_a_traceback(rt: Rt, tmp_path: Path) -> None:
    pid = create(rt, Bundle(tmp_path))
    state = rt.root / "ext1" / "state.json"
    good = state.read_text()
    state.write_text(good[: len(good) // 2])
    assert f"state file {state} is not valid JSON" in rt.fail("state", "ext1")
    state.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "mobynit"}))
    assert f"state file {state} lacks field 'mobynit'" in rt.fail("start", "ext1")
    state.write_text(good)
    rt("delete", "--force", "ext1")
    exit_status(pid)


def test_racing_kill_and_delete_never_corrupt_the_state(rt: Rt, tmp_path: Path) -> None:
    """What the shim does on a stop: kills and forced deletes, many at once, from separate processes."""
    b = Bundle(tmp_path)
    for round_ in range(3):
        pid = create(rt, b)
        procs = [Spawned(rt.argv(*(("kill", "ext1", "TERM") if i % 2 else ("delete", "--force", "ext1"))), rt.env)
                 for i in range(6)]
        readers = [Spawned(rt.argv("state", "ext1"), rt.env) for _ in range(4)]
        for p in procs + readers:
            rc, out, err = p.result()
            assert "Traceback" not in err
            if p in readers and rc == 0:
                assert json.loads(out)["id"] == "ext1"  # never a torn file
            elif rc:
                assert "container not running" in err or "does not exist" in err, err
        assert exit_status(pid) in (0, 137)
        assert b.steps().count("delete") == round_ + 1  # exactly one delete found the state
        assert leftovers(rt) == []


def test_racing_creates_make_one_container(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    procs = [Spawned(rt.argv("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / f"pid{i}"), "ext1"), rt.env)
             for i in range(5)]
    results = [p.result() for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 1, 1, 1, 1]
    assert all("already exists" in err for rc, _, err in results if rc)
    assert b.steps() == ["create"]
    pid = int(next(tmp_path.glob("pid*")).read_text())
    assert proxies() == [pid]
    rt("delete", "--force", "ext1")
    assert exit_status(pid) == 137


# --- command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--bogus", "state", "x"), "unknown option '--bogus'"),
        (("create", "--bundle", "b", "--pid-file", "p", "--frobnicate", "x"), "create: unknown option '--frobnicate'"),
        (("create", "--bundle"), "option --bundle needs a value"),
        (("exec", "x"), "'exec' is not supported"),
        (("frob",), "unknown command 'frob'"),
        ((), "no command given"),
        (("start",), "start: expected an ID, got 0 arguments"),
        (("delete", "--force=maybe", "x"), "takes no value"),
        (("state", "../etc"), "invalid container id '../etc'"),
    ],
)
def test_bad_command_lines_get_a_sentence(rt: Rt, args: tuple[str, ...], message: str) -> None:
    proc = rt(*args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_log_format_and_no_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mobynit.runtime.cli", "--root", str(tmp_path)]
    proc = run_files([*cmd, "--log-format", "xml", "state", "x"])
    assert proc.returncode == 1 and "--log-format must be text or json, not 'xml'" in proc.stderr
    proc = run_files([*cmd, "state", "x"])
    assert (proc.returncode, proc.stderr) == (1, "mobynit-runtime: container x does not exist\n")


def test_runc_flag_spellings_and_version(rt: Rt, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid_file = tmp_path / "pid"
    rt("--systemd-cgroup", "--debug", "create", f"--bundle={b.path}", "--pid-file", str(pid_file),
       "--no-pivot", "--no-new-keyring", "ext1")
    assert any(e["level"] == "debug" and "called as" in e["msg"] for e in rt.entries())
    assert run_files([sys.executable, "-m", "mobynit.runtime.cli", f"-root={rt.root}", "delete", "-f", "ext1"]).returncode == 0
    assert exit_status(int(pid_file.read_text())) == 137
    out = run_files([sys.executable, "-m", "mobynit.runtime.cli", "--version"]).stdout
    assert out.startswith("mobynit-runtime version ") and "spec: 1.0.2" in out
    features = json.loads(rt("features").stdout)
    assert features["ociVersionMax"] == OCI_VERSION


def test_parse_signal() -> None:
    assert commands.parse_signal("9") == signal.SIGKILL
    assert commands.parse_signal("term") == signal.SIGTERM
    assert commands.parse_signal("SIGUSR1") == signal.SIGUSR1
    for bad in ("0", "999", "SIG", "Signals", "-1", "KILL9"):
        with pytest.raises(UsageError):
            commands.parse_signal(bad)


def test_spec_volumes_rejects_malformed_mounts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="mounts is not a list"):
        spec.spec_volumes({"mounts": {}}, "cfg")
    with pytest.raises(RuntimeFailure, match="has no destination"):
        spec.spec_volumes({"mounts": [{"source": "/x", "type": "bind"}]}, "cfg")
    assert spec.spec_volumes({"mounts": [{"destination": "/x", "type": "tmpfs"}, {"destination": "y"}]}, "c") == {"/x": ""}
