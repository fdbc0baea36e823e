"""What an extension may do to the hostapp's files, proved on a real mount.

Normal extensions add; overrides replace; nothing deletes or hides: an
extension's whiteouts and opaque directories act only inside its own layers,
even when they name hostapp paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.device import ExtensionSpec, HostappSpec, Layer, build_device
from tests.runs import assembled, read

pytestmark = pytest.mark.engine

CLASS = {"io.balena.image.class": "overlay"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    hostapp = HostappSpec(
        layers=(
            Layer(files={
                "etc/keep": "hostapp keep\n",
                "etc/replace": "hostapp\n",
                "usr/share/hostapp/a": "a\n",
                "usr/share/hostapp/b": "b\n",
            }),
            Layer(files={"etc/extra": "extra\n"}),
        )
    )
    extensions = (
        # An override that tries to delete and hide hostapp files.
        ExtensionSpec(
            name="override-eraser",
            labels={**CLASS, "io.balena.image.override": "1"},
            layers=(
                Layer(files={"etc/replace": "override\n", "usr/share/override-eraser/x": "x\n"}),
                Layer(
                    files={"usr/share/hostapp/from-override": "o\n"},
                    delete=["etc/keep", "usr/share/override-eraser/x"],
                    opaque=["usr/share/hostapp"],
                ),
            ),
        ),
        # A normal extension that tries the same, and to replace a file.
        ExtensionSpec(
            name="normal-eraser",
            labels=dict(CLASS),
            layers=(
                Layer(files={"etc/replace": "normal\n"}),
                Layer(files={"etc/normal-added": "n\n"}, delete=["etc/extra", "usr/share/hostapp/b"], opaque=["etc"]),
            ),
        ),
    )
    return build_device(tmp_path_factory.mktemp("hostile"), hostapp, extensions)


def test_no_extension_deletes_or_hides_hostapp_files(hostile, tmp_path: Path) -> None:
    with assembled(hostile, tmp_path) as (root, record, _):
        assert sorted(e["name"] for e in record["extensions"] if e["included"]) == ["normal-eraser", "override-eraser"]
        assert read(root, "etc/replace") == "override\n", "an override replaces"
        assert read(root, "etc/keep") == "hostapp keep\n", "an override's whiteout does not reach the hostapp"
        assert read(root, "etc/extra") == "extra\n", "a normal extension's whiteout does not either"
        assert sorted(os.listdir(root / "usr/share/hostapp")) == ["a", "b", "from-override"], "no opaque dir hides"
        assert read(root, "etc/normal-added") == "n\n", "a normal extension adds"
        # Inside its own layers, an extension's whiteout still acts.
        assert not (root / "usr/share/override-eraser/x").exists()
