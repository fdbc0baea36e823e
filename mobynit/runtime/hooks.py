"""The image's hooks: when they run, with what environment, and for how long."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
from collections.abc import Mapping

from mobynit.core import labels as label
from mobynit.core.errors import UsageError, shown
from mobynit.runtime import RuntimeFailure
from mobynit.runtime.log import Log

HOOK_TIMEOUT_ENV = "MOBYNIT_RUNTIME_HOOK_TIMEOUT"
HOOK_TIMEOUT = 60.0
HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_suffix(text: str) -> str:
    """The portable spelling: `kernel-abi-id` -> `KERNEL_ABI_ID`, `/data/my.vol` -> `DATA_MY_VOL`."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in text.strip("/")).upper()


def env_names(prefix: str, text: str, is_path: bool) -> list[str]:
    """The variable names for a label suffix or a mount destination.

    First the name the tool we replace gives (hooks written for it find their
    variables): upper case, `-` (and for a destination `/`, after dropping
    one leading `/`) replaced by `_`, nothing else touched. When that is not a
    name a shell can read (`/data/my.vol` -> `DATA_MY.VOL`), also the portable
    one, every character other than a letter or digit made `_`.
    """
    go = text.removeprefix("/") if is_path else text
    go = go.replace("-", "_")
    if is_path:
        go = go.replace("/", "_")
    go = go.upper()
    names = []
    if go and "=" not in go:
        names.append(prefix + go)
    if not _SHELL_NAME.fullmatch(prefix + go):
        portable = env_suffix(text)
        if portable.strip("_") and prefix + portable not in names:
            names.append(prefix + portable)
    return names


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

    `io.balena.image.<x>` labels become EXTENSION_IMAGE_<X>; each mount, by
    its destination, EXTENSION_VOLUME_<DEST>=<source> (names: see env_names;
    for two that collide, the later in sorted order wins, as in the tool we
    replace).
    """
    env = {"PATH": HOOK_PATH}
    if rootfs is not None:
        env["EXTENSION_ROOTFS"] = rootfs
    for key in sorted(labels):
        if key.startswith(label.PREFIX) and key != label.PREFIX:
            value = labels[key]
            if not _env_safe(value) or not _env_safe(key):
                continue  # a NUL or a lone surrogate cannot go into an environment: left out
            for name in env_names("EXTENSION_IMAGE_", key[len(label.PREFIX) :], is_path=False):
                env[name] = value
    for dest in sorted(volumes):
        if dest.startswith("/") and _env_safe(dest) and _env_safe(volumes[dest]):
            for name in env_names("EXTENSION_VOLUME_", dest, is_path=True):
                env[name] = volumes[dest]
    return env


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
    stdin is /dev/null, stdout and stderr go to our stderr (the container's
    during create).

    Nothing the hook starts outlives it: it runs as PID 1 of a PID namespace
    of its own, so when it ends (by itself, or killed at the timeout) the
    kernel kills every process left in that namespace, setsid or
    double-forked alike, and their hold on our stdio goes with them.
    Without the privilege to make a namespace it runs in a session of its
    own, and that session is killed instead (a setsid escapes that one).
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
            preexec_fn=_own_pid_namespace,
        )
    except OSError as e:
        raise RuntimeFailure(f"hook {path} cannot be executed: {e.strerror}") from None
    except subprocess.SubprocessError as e:
        raise RuntimeFailure(f"hook {path} cannot be started: {e}") from None
    try:
        status = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise RuntimeFailure(f"hook {path} did not finish within {limit:g} s and was killed") from None
    finally:
        _kill_group(proc.pid)  # only matters without a namespace: what is left in its session
    if status < 0:
        raise RuntimeFailure(f"hook {path} was killed by signal {signal.Signals(-status).name}")
    if status:
        raise RuntimeFailure(f"hook {path} failed with exit status {status}")
    log("info", f"hook {path} succeeded")
    return True


# --- the hook's PID namespace ----------------------------------------------------------------
#
# Popen's child (the "keeper") unshares a PID namespace and forks: its child
# returns from here to exec the hook as PID 1 of the namespace; the keeper
# stays outside, waits for it and exits with its status. On SIGTERM the
# keeper SIGKILLs the hook and waits again: PID 1's exit returns only once
# every process of its namespace is gone, so when the keeper exits, nothing
# the hook started is left. Should the keeper die first, PR_SET_PDEATHSIG
# kills the hook.

CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
NO_EXEC = 126  # the keeper's status when it could not run the hook at all (as a shell's)
KEEPER_GRACE = 10.0


def _own_pid_namespace() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        return  # no privilege: the hook runs in its own session only
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.set_blocking(alive_r, False)
        try:
            gone = os.read(alive_r, 1) == b""  # EOF: the keeper died before prctl could matter
        except BlockingIOError:
            gone = False
        os.close(alive_r)
        if gone:
            os._exit(NO_EXEC)
        return  # on to exec the hook, as PID 1 of the new namespace
    _keep(pid, alive_r, alive_w)


def _keep(pid: int, alive_r: int, alive_w: int) -> None:
    """The keeper: never returns."""
    try:
        os.close(alive_r)
        os.closerange(3, alive_w)
        os.closerange(alive_w + 1, os.sysconf("SC_OPEN_MAX"))  # Popen's error pipe above all
        signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            os._exit(128 + sig)
        os._exit(os.waitstatus_to_exitcode(status))
    finally:
        os._exit(NO_EXEC)


def _kill(proc: subprocess.Popen) -> None:
    """At the timeout: the keeper kills the hook and waits for its namespace to empty."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=KEEPER_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
