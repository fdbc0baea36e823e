"""The extension manager against the real engine: what it removes, what it keeps.

One engine (with our runtime registered) holds a mix of containers made the
way a device gets them: extensions installed with `docker run --runtime
extension`, one whose create hook failed, dead ones (the engine cannot be
asked for that state, so it is set in the store while the engine is stopped,
as harness.device does), a plain app, and stale extensions whose volumes
carry `deactivate` hooks. The manager runs as its console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.device import set_state
from tests.harness.engine import Engine, EngineError
from tests.harness.rootfs import File
from mobynit.runtime import cli

pytestmark = pytest.mark.engine

MANAGER = Path(sys.executable).parent / "mobynit-extension-manager"
RUNTIME = Path(sys.executable).parent / "mobynit-runtime"
RELEASE = "6.1.0-mobynit-test"  # the kernel the manager is told is running
SYMVERS = b"0x12345678\tprintk\tvmlinux\tEXPORT_SYMBOL\n"
ABI = hashlib.sha256(SYMVERS).hexdigest()
OVERLAY = {"io.balena.image.class": "overlay"}

IMAGES = {
    "ext-ok": {**OVERLAY, "io.balena.image.kernel-version": "6.1.0", "io.balena.image.os-version": "2.118.*, 2.119.*"},
    "ext-oldkernel": {**OVERLAY, "io.balena.image.kernel-version": "5.15.0"},
    "ext-oldos": {**OVERLAY, "io.balena.image.os-version": "2.118.*"},
    "ext-abi": {**OVERLAY, "io.balena.image.kernel-abi-id": ABI},
    "ext-legacy": {"io.balena.features.host-extension": "1"},
    "ext-badhook": OVERLAY,
    "ext-orphan": {**OVERLAY, "io.balena.image.os-version": "99.99.99"},  # no container: an OS update left it
    "ext-orphan-ok": {**OVERLAY, "io.balena.image.os-version": "2.119.*"},
    "app": {},
}


def dockerfile(labels: dict[str, str]) -> str:
    label = "".join(f"LABEL {json.dumps(k)}={json.dumps(v)}\n" for k, v in labels.items())
    return f'FROM scratch\n{label}COPY . /\nCMD ["/never-run"]\n'


class Device:
    def __init__(self, engine: Engine, tmp: Path) -> None:
        self.engine = engine
        self.tmp = tmp
        self.cmdline = tmp / "cmdline"
        self.os_release = tmp / "os-release"
        self.os_release.write_text('ID=balena-os\nVERSION_ID="2.119.3"\n')
        self.ids: dict[str, str] = {}

    def names(self) -> set[str]:
        out = self.engine.docker("ps", "-a", "--format", "{{.Names}}")
        return set(out.split())

    def manager(self, *args: str, abi: str | None = None) -> subprocess.CompletedProcess[str]:
        self.cmdline.write_text(f"root=/dev/sda2 {f'balena_kernel_abi={abi}' if abi else ''} quiet\n")
        extra = ["--os-release", str(self.os_release), "--kernel-release", RELEASE, "--cmdline", str(self.cmdline)]
        proc = subprocess.run(
            [str(MANAGER), "--host", self.engine.host, "--timeout", "60", "cleanup", *args,
             *(extra if "--stale-os" in args else [])],
            capture_output=True, text=True, timeout=600,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def volume_dir(self, name: str) -> Path:
        return Path(self.engine.docker("volume", "inspect", "-f", "{{.Mountpoint}}", name).strip())


def deactivate_hook(evidence: Path, status: int = 0) -> File:
    return File(
        "#!/bin/sh\n"
        f'echo "$PWD kernel=$EXTENSION_IMAGE_KERNEL_VERSION boot=$EXTENSION_VOLUME_BOOT" >> "{evidence}"\n'
        f"exit {status}\n",
        0o755,
    )


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run dockerd")
    tmp = tmp_path_factory.mktemp("manager-engine")
    data = tmp / "data"
    wrapper = tmp / "extension-runtime"
    wrapper.write_text(f'#!/bin/sh\nexport {cli.ENGINE_ROOT_ENV}="{data}"\nexec "{RUNTIME}" "$@"\n')
    wrapper.chmod(0o755)
    engine = Engine(data, ["--add-runtime", f"extension={wrapper}"])
    d = Device(engine, tmp)
    files = {"etc/payload": "x"}
    special = {
        "ext-badhook": {**files, "hooks/create": File("#!/bin/sh\nexit 5\n", 0o755)},
        "ext-abi": {**files, f"lib/modules/{RELEASE}/Module.symvers": SYMVERS},
    }
    with engine:
        engine.build_many([(f"{name}:1", dockerfile(labels), special.get(name, files)) for name, labels in IMAGES.items()])
        for vol, status in (("boot-old", 0), ("boot-stuck", 1)):
            engine.docker("volume", "create", vol)
            hook = deactivate_hook(tmp / f"{vol}.evidence", status)
            path = d.volume_dir(vol) / "deactivate"
            path.write_text(str(hook.content))
            path.chmod(hook.mode)
        installs = [
            ("ok", "ext-ok"), ("oldkernel", "ext-oldkernel", "-v", "boot-old:/boot"),
            ("stuck", "ext-oldkernel", "-v", "boot-stuck:/boot"), ("oldos", "ext-oldos", "-v", "/anonymous"),
            ("abi", "ext-abi"),
        ]
        for name, image, *opts in installs:
            engine.docker("run", "--name", name, "--runtime", "extension", *opts, f"{image}:1")
        with pytest.raises(EngineError, match="exit status 5"):
            engine.docker("run", "--name", "failed", "--runtime", "extension", "ext-badhook:1")
        for name, image in (("dead-ext", "ext-ok"), ("dead-legacy", "ext-legacy"), ("dead-app", "app"), ("app", "app")):
            engine.create(f"{image}:1", name, ["/never-run"])
        d.ids = {n: engine.inspect(n)["Id"] for n in d.names()}
    for name in ("dead-ext", "dead-legacy", "dead-app"):
        set_state(data / "containers" / d.ids[name] / "config.v2.json", "Dead")
    with engine:
        states = {n: engine.inspect(n)["State"]["Status"] for n in d.names()}
        assert states["dead-ext"] == states["dead-app"] == "dead" and states["failed"] == "created"
        yield d


def test_cleanup_then_stale_os(device: Device) -> None:
    d = device
    everything = {"ok", "oldkernel", "stuck", "oldos", "abi", "failed", "dead-ext", "dead-legacy", "dead-app", "app"}
    assert d.names() == everything

    # Plain cleanup: the dead and failed extensions go; a dead app is not ours to judge.
    proc = d.manager()
    assert proc.returncode == 0, proc.stderr
    assert d.names() == everything - {"failed", "dead-ext", "dead-legacy"}
    assert f"removed failed ({d.ids['failed'][:12]}): it failed: " in proc.stderr
    assert f"removed dead-ext ({d.ids['dead-ext'][:12]}): the engine marked it dead" in proc.stderr
    assert not (d.tmp / "boot-old.evidence").exists()  # no deactivate hook without --stale-os

    # The same again finds nothing.
    proc = d.manager()
    assert proc.returncode == 0 and "nothing to remove" in proc.stderr

    # --stale-os: the kernel and OS checks. A deactivate hook that fails is reported (exit 1) and its
    # container removed all the same (as the Go tool); its volume, with the hook, stays.
    anonymous = [m["Name"] for m in d.engine.inspect("oldos")["Mounts"] if m["Destination"] == "/anonymous"]
    assert len(anonymous) == 1 and anonymous[0] in volumes(d)
    boot_old = d.volume_dir("boot-old")
    proc = d.manager("--stale-os", abi=ABI)
    assert proc.returncode == 1
    assert d.names() == {"ok", "abi", "dead-app", "app"}
    assert f"removed oldkernel ({d.ids['oldkernel'][:12]}): built for kernel 5.15.0, running kernel is 6.1.0" in proc.stderr
    assert "removed oldos" in proc.stderr and "io.balena.image.os-version=2.118.*" in proc.stderr
    assert f"stuck ({d.ids['stuck'][:12]}): its deactivate hook failed: " in proc.stderr
    assert "removed all the same, its volumes kept" in proc.stderr
    assert (d.tmp / "boot-old.evidence").read_text() == f"{boot_old} kernel=5.15.0 boot={boot_old}\n"
    # The stale containers' named volumes and images go once unused; the anonymous volume went with its container.
    assert volumes(d) == {"boot-stuck"}
    assert images(d) == {"ext-ok:1", "ext-abi:1", "ext-legacy:1", "ext-badhook:1", "ext-orphan-ok:1", "app:1"}
    assert "removed image ext-orphan:1" in proc.stderr  # stale by its own labels, no container at all
    assert "removed volume boot-old of oldkernel" in proc.stderr

    # A different kernel ABI makes `abi` stale too; its image goes with it. Then nothing is left to do.
    proc = d.manager("--stale-os", abi="f" * 64)
    assert proc.returncode == 0, proc.stderr
    assert d.names() == {"ok", "dead-app", "app"}
    assert f"removed abi ({d.ids['abi'][:12]}): kernel ABI {ABI} does not match" in proc.stderr
    assert "ext-abi:1" not in images(d) and "ext-ok:1" in images(d)
    proc = d.manager("--stale-os", abi="f" * 64)
    assert proc.returncode == 0 and "nothing to remove" in proc.stderr, proc.stderr


def volumes(d: Device) -> set[str]:
    return set(d.engine.docker("volume", "ls", "-q").split())


def images(d: Device) -> set[str]:
    return set(d.engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}").split())


def test_the_go_name_and_its_flags(device: Device) -> None:
    """balena-extension-manager, as a device's units call it: --log-level, DOCKER_HOST as a bare path."""
    go = Path(sys.executable).parent / "balena-extension-manager"
    env = {"PATH": os.environ["PATH"], "DOCKER_HOST": device.engine.host.removeprefix("unix://")}
    proc = subprocess.run([str(go), "--log-level", "error", "cleanup"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert (proc.returncode, proc.stderr) == (0, "")  # nothing to remove, and info is below error
    proc = subprocess.run([str(go), "cleanup"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "balena-extension-manager: nothing to remove" in proc.stderr
    proc = subprocess.run([str(go), "cleanup"], capture_output=True, text=True, timeout=300,
                          env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 1 and "/var/run/balena-engine.sock" in proc.stderr  # the Go tool's default
