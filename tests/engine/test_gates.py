"""Compatibility gates on a real store: systemd-sysext release files and os-version globs.

The hostapp's os-release says ID=balena-os VERSION_ID=7.0.0; each extension
carries a release file or an os-version label that agrees or not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.device import OVERLAY_CLASS, ExtensionSpec, HostappSpec, Layer, build_device
from mobynit.core.compat import host_architecture
from tests.runs import assembled, by_name, plan

pytestmark = pytest.mark.engine

RELEASE_DIR = "usr/lib/extension-release.d"


def sysext(name: str, release: str, file_name: str | None = None) -> ExtensionSpec:
    files = {f"{RELEASE_DIR}/extension-release.{file_name or name}": release, f"usr/share/{name}/hello": "hi\n"}
    return ExtensionSpec(name=name, layers=(Layer(files=files),), labels=dict(OVERLAY_CLASS))


def labelled(name: str, os_version: str) -> ExtensionSpec:
    return ExtensionSpec(
        name=name,
        layers=(Layer(files={f"usr/share/{name}/hello": "hi\n"}),),
        labels={**OVERLAY_CLASS, "io.balena.image.os-version": os_version},
    )


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory):
    hostapp = HostappSpec(layers=(Layer(files={
        "usr/lib/os-release": 'ID=balena-os\nID_LIKE="poky"\nVERSION_ID=7.0.0\n',
        "etc/hostapp-file": "hostapp\n",
    }),))
    arch = host_architecture()
    extensions = (
        sysext("sx-match", "ID=balena-os\nVERSION_ID=7.0.0\n"),
        sysext("sx-like", "ID=poky\nVERSION_ID=7.0.0\n"),
        sysext("sx-any", "ID=_any\n"),
        sysext("sx-other-os", "ID=fedora\nVERSION_ID=40\n"),
        sysext("sx-old", "ID=balena-os\nVERSION_ID=6.0.0\n"),
        sysext("sx-arch", f"ID=balena-os\nVERSION_ID=7.0.0\nARCHITECTURE={'arm64' if arch != 'arm64' else 'x86-64'}\n"),
        sysext("sx-own-arch", f"ID=balena-os\nVERSION_ID=7.0.0\nARCHITECTURE={arch}\n"),
        sysext("sx-renamed", "ID=balena-os\nVERSION_ID=7.0.0\n", file_name="something-else"),
        labelled("osv-match", "6.*, 7.*"),
        labelled("osv-mismatch", "5.*,6.?.*"),
    )
    return build_device(tmp_path_factory.mktemp("gated"), hostapp, extensions)


def test_sysext_release_files(gated) -> None:
    found = by_name(plan(gated))
    for name in ("sx-match", "sx-like", "sx-any", "sx-own-arch", "sx-renamed", "osv-match"):
        assert found[name]["included"], (name, found[name].get("reason"))
    assert "built for OS fedora" in found["sx-other-os"]["reason"]
    assert "VERSION_ID=6.0.0" in found["sx-old"]["reason"]
    assert "architecture" in found["sx-arch"]["reason"]


def test_os_version_warns_unless_strict(gated, tmp_path: Path) -> None:
    lenient = by_name(plan(gated))["osv-mismatch"]
    assert lenient["included"] and "does not match the hostapp's VERSION_ID 7.0.0" in lenient["warning"]
    strict = by_name(plan(gated, "mobynit.strict_os_version"))["osv-mismatch"]
    assert not strict["included"] and "mobynit.strict_os_version" in strict["reason"]
    with assembled(gated, tmp_path, "mobynit.strict_os_version") as (root, record, stderr):
        assert not (root / "usr/share/osv-mismatch").exists()
        assert (root / "usr/share/sx-match/hello").exists() and not (root / "usr/share/sx-other-os").exists()
        assert "extension sx-other-os: skipped: extension-release.sx-other-os: built for OS fedora" in stderr
