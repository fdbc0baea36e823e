"""The runtime's units in a booted system: the Debian hostapp under QEMU.

The hostapp (qemu/debian.py) installs docs/examples/extension-runtime.conf
(the engine's drop-in that registers `balena-extension-runtime` as runtime
`extension`) and docs/examples/mobynit-extension-cleanup.service (the
manager's `cleanup --stale-os` after the confirmed boot). Its data store holds
`debian-ext` and `debian-stale` (made for Debian 11). In the booted system the
probe runs an extension with `docker run --runtime extension` and reports
what the cleanup unit did: the oracle is the engine of the guest itself
(`docker info`, `docker ps -a`), read on the console.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.boot import kit as boot_kit

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (device nodes in the initramfs, dockerd)")
    kit = boot_kit.make_kit(tmp_path_factory.mktemp("boot"), lambda line: sys.stderr.write(f"\n{line}\n"))
    kit.boot(["debian"])
    return kit.results["debian"]


def test_the_engine_runs_extensions_with_the_registered_runtime(debian) -> None:
    res = debian
    assert res.returncode == 0 and res.console.mark("done") is not None, res.describe()
    runtimes = res.console.mark("runtimes")
    assert runtimes == '{"path":"/usr/bin/balena-extension-runtime"}', res.describe()
    # The engine created, started and deleted the extension through our runtime: Exited (0).
    assert res.console.mark("ext-run", ) is not None and res.console.mark("ext-run").split()[:2] == ["0", "0"], (
        res.describe())


def test_the_cleanup_unit_removes_the_stale_extension_after_the_confirmed_boot(debian) -> None:
    res = debian
    assert res.console.mark("confirm") == "active success", res.describe()
    assert res.console.mark("cleanup") == "active success", res.describe()
    said = res.console.marks("cleanup-said")
    assert any(line.startswith("mobynit-extension-manager: removed debian-stale (") and
               "io.balena.image.os-version=11" in line for line in said), said
    assert any(line.startswith("mobynit-extension-manager: removed image") for line in said), said
    assert res.console.mark("containers").split() == ["debian-ext"], res.describe()
