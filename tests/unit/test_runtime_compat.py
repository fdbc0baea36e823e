"""mobynit-runtime installed under the Go tool's name, called the way its own tests call it.

The facts come from the Go project's end-to-end tests (`balena-extension-runtime`
with `XDG_RUNTIME_DIR` and no `--root`, output read with CombinedOutput, i.e.
through one pipe to its end, `--pid-file` optional, `kill --all ID 9` as
containerd's force-delete path sends it); the code is ours. Every call goes
through a pipe with a time limit: a proxy or a hook's child holding the
caller's descriptors makes the call time out and the test fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobynit.runtime import proxy
from tests.unit.test_runtime import Bundle, exit_status, hook, proxies, reaper  # noqa: F401 (fixture)

BIN = Path(sys.executable).parent
GO_RUNTIME = BIN / "balena-extension-runtime"
GO_MANAGER = BIN / "balena-extension-manager"
OURS = BIN / "mobynit-runtime"
OUR_MANAGER = BIN / "mobynit-extension-manager"


def combined(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 30) -> tuple[int, str]:
    """exec.Command(...).CombinedOutput(): stdout and stderr on one pipe, read to EOF."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                          timeout=timeout, text=True)
    assert "Traceback" not in proc.stdout, proc.stdout
    return proc.returncode, proc.stdout


class Go:
    """The runtime as the Go e2e tests drive it: only XDG_RUNTIME_DIR says where state goes."""

    def __init__(self, tmp: Path) -> None:
        self.xdg = tmp / "xdg"
        self.xdg.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MOBYNIT_")}
        self.env["XDG_RUNTIME_DIR"] = str(self.xdg)

    def __call__(self, *args: str, ok: bool = True, cwd: Path | None = None) -> str:
        rc, out = combined([str(GO_RUNTIME), *args], self.env, cwd)
        assert (rc == 0) == ok, out
        return out


@pytest.fixture
def go(tmp_path: Path, reaper: None) -> Go:
    assert GO_RUNTIME.exists(), f"{GO_RUNTIME} missing: .venv/bin/pip install -e ."
    return Go(tmp_path)


def gone(pid: int) -> bool:
    """The proxy is dead (a zombie the reaper has not collected counts as dead)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        st = proxy.proc_stat(pid)
        if st is None or st[0] in "ZXx":
            return True
        time.sleep(0.01)
    return False


def go_create(go: Go, tmp_path: Path, cid: str, bundle: Bundle) -> int:
    pid_file = tmp_path / f"{cid}.pid"
    go("create", "--bundle", str(bundle.path), "--pid-file", str(pid_file), cid)
    pid = int(pid_file.read_text())
    os.kill(pid, 0)
    return pid


def test_lifecycle_under_the_go_name(go: Go, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    pid = go_create(go, tmp_path, "test-ext-1", b)
    state = json.loads(go("state", "test-ext-1"))
    assert (state["status"], state["pid"]) == ("created", pid)
    assert (go.xdg / "balena-extension-runtime" / "test-ext-1" / "state.json").is_file()
    go("start", "test-ext-1")
    assert exit_status(pid) == 0
    assert json.loads(go("state", "test-ext-1"))["status"] == "stopped"
    go("delete", "test-ext-1")
    go("state", "test-ext-1", ok=False)
    assert b.steps() == ["create", "start", "delete"]
    assert os.listdir(go.xdg / "balena-extension-runtime") == []


def test_unsupported_class_is_named(go: Go, tmp_path: Path) -> None:
    b = Bundle(tmp_path, labels={"io.balena.image.class": "volume"})
    out = go("create", "--bundle", str(b.path), "bad-label-test", ok=False)  # no --pid-file
    assert 'unsupported io.balena.image.class="volume", must be "overlay"' in out
    assert "looked in the OCI annotations" in out


def test_missing_label_says_where_it_looked(go: Go, tmp_path: Path) -> None:
    b = Bundle(tmp_path, labels={})
    out = go("create", "--bundle", str(b.path), "no-label-test", ok=False)
    assert "missing required label io.balena.image.class" in out
    assert "/var/lib/docker/containers/no-label-test/config.v2.json" in out  # the default store, looked in
    assert b.steps() == []


@pytest.mark.parametrize("args", [("SIGTERM",), ("--all", "9")], ids=["sigterm", "all-9"])
def test_kill_the_proxy(go: Go, tmp_path: Path, args: tuple[str, ...]) -> None:
    b = Bundle(tmp_path)
    pid = go_create(go, tmp_path, "kill-test", b)
    if args[0] == "--all":
        go("kill", "--all", "kill-test", *args[1:])
    else:
        go("kill", "kill-test", *args)
    assert gone(pid)
    assert json.loads(go("state", "kill-test"))["status"] == "stopped"
    go("kill", "kill-test", "SIGKILL")  # again, the proxy already gone: stopped as asked, exit 0
    go("delete", "--force", "kill-test")


def test_hooks_see_rootfs_and_image_labels(go: Go, tmp_path: Path) -> None:
    b = Bundle(tmp_path, labels={"io.balena.image.class": "overlay", "io.balena.image.kernel-abi-id": "abc"},
               hooks={"create": hook(f'echo "$EXTENSION_ROOTFS $EXTENSION_IMAGE_CLASS $EXTENSION_IMAGE_KERNEL_ABI_ID"'
                                     f' > "{tmp_path}/seen"')})
    pid = go_create(go, tmp_path, "hook-test", b)
    assert (tmp_path / "seen").read_text() == f"{b.rootfs} overlay abc\n"
    go("delete", "--force", "hook-test")
    assert exit_status(pid) == 137


def test_bundle_defaults_to_the_working_directory_and_go_flags_work(go: Go, tmp_path: Path) -> None:
    b = Bundle(tmp_path)
    log = tmp_path / "go.log"
    go("--log-level", "debug", "--log", str(log), "--docker-root", str(tmp_path / "nowhere"), "create", "cwd-test",
       cwd=b.path)
    assert b.steps() == ["create"]
    assert "called as" in log.read_text()  # debug level reached the log
    pid = proxies()[0]
    go("--root", str(tmp_path / "elsewhere"), "state", "cwd-test", ok=False)  # --root wins over XDG
    go("delete", "--force", "cwd-test")
    assert exit_status(pid) == 137
    out = go("--log-level", "loud", "state", "x", ok=False)
    assert "--log-level must be debug, info, warn or error, not 'loud'" in out


def test_a_hook_child_holding_stdio_does_not_hold_the_caller(go: Go, tmp_path: Path) -> None:
    """A create hook that leaves a setsid child behind: create still returns at once through a pipe."""
    marker = tmp_path / "child"
    b = Bundle(tmp_path, hooks={"create": hook(
        f"setsid sh -c 'read p _ < /proc/self/stat; echo $p > \"{marker}\"; exec sleep 600' &\n"
        f'while [ ! -s "{marker}" ]; do sleep 0.01; done\necho hook done')})
    start = time.monotonic()
    out = go("create", "--bundle", str(b.path), "--pid-file", str(tmp_path / "pid"), "stdio-test")
    assert time.monotonic() - start < 20 and "hook done" in out
    child = int(marker.read_text())
    assert gone(child)  # nothing a hook starts outlives it
    go("delete", "--force", "stdio-test")
    assert exit_status(int((tmp_path / "pid").read_text())) == 137


@pytest.mark.parametrize("program", [GO_RUNTIME, OURS, GO_MANAGER, OUR_MANAGER], ids=lambda p: p.name)
def test_help_and_version_everywhere(program: Path, tmp_path: Path) -> None:
    commands = ["cleanup"] if "manager" in program.name else ["create", "start", "state", "kill", "delete", "features"]
    rc, out = combined([str(program), "--version"])
    assert rc == 0 and out.startswith(f"{program.name} version ")
    rc, out = combined([str(program), "--help"])
    assert rc == 0 and f"usage: {program.name}" in out
    for command in commands:
        rc, out = combined([str(program), command, "--help"])
        assert rc == 0 and command in out and "usage:" in out, out
        rc, out = combined([str(program), command, "--version"])
        assert rc == 0 and out.startswith(f"{program.name} version "), out


def test_unknown_option_is_one_sentence_with_one_prefix(tmp_path: Path) -> None:
    for program in (GO_RUNTIME, OURS):
        rc, out = combined([str(program), "--bogus", "state", "x"])
        assert (rc, out) == (1, f"{program.name}: unknown option '--bogus'\n")


def test_the_manager_is_chosen_by_the_name_called(tmp_path: Path) -> None:
    """One program, as the Go tool ships it: a symlink named balena-extension-manager is the manager."""
    link = tmp_path / "balena-extension-manager"
    link.symlink_to(GO_RUNTIME)
    rc, out = combined([str(link), "--help"])
    assert rc == 0 and "usage: balena-extension-manager" in out and "cleanup" in out
    rc, out = combined([str(link), "cleanup"], env={"PATH": os.environ["PATH"], "DOCKER_HOST": str(tmp_path / "no.sock")})
    assert rc == 1 and f"{tmp_path / 'no.sock'}: no such socket; is the engine running?" in out
