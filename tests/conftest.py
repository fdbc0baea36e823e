"""Session-wide test set-up: kinds, private mount namespaces and the real-engine devices.

Tests live by kind, and each is marked with its folder's name, so `-m unit`
(or `pytest tests/unit`) picks the fast ones: unit (no engine, no machine),
engine (stores written by the real engine), boot (QEMU machines and the
pieces that build them), fuzz (hypothesis against hostile stores).

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

from tests.harness import device as devices
from tests.harness import engine as engines
from tests.harness import mounts


KINDS = ("unit", "engine", "boot", "fuzz")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = item.path.parent.name
        if kind in KINDS:
            item.add_marker(kind)


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
