"""The whole chain: an extension installed through the engine with our runtime,
on a device's data store, is in the root the device boots under QEMU.

The device (hostapp store, empty data store) is built by harness.device; then
the data store's own engine, with `--add-runtime extension=<mobynit-runtime>`,
runs the extension as balena's supervisor would; the disk made of both boots
Debian's kernel with mobynit's initramfs (tests/boot_kit.py), and the
hostapp's probe init lists what the booted root holds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.harness.device import build_device
from tests.harness.engine import Engine
from tests.harness.rootfs import File
from mobynit.runtime import cli
from qemu import devices, disk, runner
from tests.boot import kit as boot_kit

pytestmark = [pytest.mark.engine, pytest.mark.boot]

RUNTIME = Path(sys.executable).parent / "mobynit-runtime"
HOOK = File('#!/bin/sh\necho "${0##*/} $(cat "$EXTENSION_ROOTFS/usr/share/chain/hello")" >> "$EXTENSION_VOLUME_EVIDENCE/steps"\n',
            0o755)


def test_an_extension_installed_by_the_runtime_is_in_the_booted_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (dockerd, device nodes in the initramfs)")
    kit = boot_kit.make_kit(tmp_path / "kit", lambda line: sys.stderr.write(f"\n{line}\n"))
    dev = build_device(tmp_path / "device", devices.probe_hostapp())
    store = dev.data / "docker"
    wrapper = tmp_path / "extension-runtime"
    wrapper.write_text(f'#!/bin/sh\nexport {cli.ENGINE_ROOT_ENV}="{store}"\nexec "{RUNTIME}" "$@"\n')
    wrapper.chmod(0o755)
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    with Engine(store, ["--add-runtime", f"extension={wrapper}"]) as engine:
        engine.build("chain:1", 'FROM scratch\nLABEL io.balena.image.class=overlay\nCOPY . /\nCMD ["/never-run"]\n', {
            "usr/share/chain/hello": "installed by mobynit-runtime\n",
            "etc/hostapp-file": "the extension must not replace this\n",
            "hooks/create": HOOK, "hooks/start": HOOK,
        })
        engine.docker("run", "--name", "chain", "--runtime", "extension", "-v", f"{evidence}:/evidence", "chain:1")
        state = engine.inspect("chain")["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0)
        ext_id = engine.inspect("chain")["Id"]
    (store / "volumes" / "backingFsBlockDev").unlink(missing_ok=True)  # a node of the build host's disk
    assert (evidence / "steps").read_text().splitlines() == [
        "create installed by mobynit-runtime", "start installed by mobynit-runtime"]

    image = disk.device_disk(tmp_path / "disk.img", dev.sysroot, dev.data)
    machine = runner.Machine(kernel=kit.kernel.vmlinuz, initrd=kit.initrd, cmdline=boot_kit.BASE_CMDLINE,
                             disks=(image.path,), timeout=120.0)
    result = runner.boot(machine, boot_kit.LOGS / "runtime-chain.log", "runtime-chain")
    seen = boot_kit.files(result)
    assert seen.get("/usr/share/chain/hello") == "installed by mobynit-runtime", result.describe()
    assert seen.get("/etc/hostapp-file") == "hostapp"  # a normal extension only adds files
    record = boot_kit.boot_record(result)
    assert record is not None, result.describe()
    chain = [e for e in record["extensions"] if e.get("id") == ext_id]
    assert len(chain) == 1 and chain[0]["included"], record["extensions"]
