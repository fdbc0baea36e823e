"""The image's hooks: when they run, with what environment, and for how long."""

from __future__ import annotations

import os
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
        if key.startswith(label.PREFIX) and key != label.PREFIX:
            value = labels[key]
            if not _env_safe(value):
                continue  # a NUL or a lone surrogate cannot go into an environment: left out
            env["EXTENSION_IMAGE_" + env_suffix(key[len(label.PREFIX) :])] = value
    for dest in sorted(volumes):
        suffix = env_suffix(dest)
        if suffix:
            env["EXTENSION_VOLUME_" + suffix] = volumes[dest]
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
