"""Session-wide test set-up: private mount namespaces and the real-engine devices.

The whole pytest process moves into a private mount namespace at start, so no
mount can reach the host even if a test crashes; every test then runs in its
own namespace, and a test that leaves a mount behind fails, naming it.
The suite must stay single-threaded: unshare(CLONE_NEWNS) refuses threads.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the harness package lives beside mobynit, not installed

from harness import device as devices  # noqa: E402
from harness import engine as engines  # noqa: E402
from harness import mounts  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        return  # tests that need root skip themselves; nothing to protect
    mounts.enter_private_namespace()


def pytest_unconfigure(config: pytest.Config) -> None:
    engines._stop_all()


@pytest.fixture(autouse=True)
def private_mount_namespace(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test in its own mount namespace; mounts it leaves behind fail it."""
    if os.geteuid() != 0:
        yield
        return
    ns = mounts.PrivateNamespace().enter()
    yield
    left = ns.leave()
    if left:
        pytest.fail(f"{request.node.nodeid} left mounts behind (now detached): {', '.join(left)}", pytrace=False)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run dockerd")


@pytest.fixture(scope="session")
def device(tmp_path_factory: pytest.TempPathFactory) -> devices.StandardDevice:
    """The standard device (docs/harness.md), built once per session with real engines."""
    _need_root()
    start = time.monotonic()
    dev = devices.build_standard_device(tmp_path_factory.mktemp("device"))
    sys.stderr.write(f"\n[harness] standard device built in {time.monotonic() - start:.1f} s\n")
    return dev


@pytest.fixture(scope="session")
def device_onelayer(tmp_path_factory: pytest.TempPathFactory) -> devices.Device:
    """A hostapp that is one imported layer, no extensions, an empty data store."""
    _need_root()
    return devices.build_onelayer_device(tmp_path_factory.mktemp("device-onelayer"))


@pytest.fixture
def device_copy(device: devices.StandardDevice, tmp_path: Path) -> devices.StandardDevice:
    """A fresh `cp -a` copy of the standard device, free to corrupt."""
    return devices.copy_device(device, tmp_path / "copy")
