"""The runtime as a device registers it: dockerd on a non-default data-root with
`--add-runtime extension=<balena-extension-runtime>` on its command line, no
wrapper, no environment for us, no daemon.json; and containerd alone (`ctr run`)
with no annotations.

The engine must find the labels itself: the runtime reads the data-root off
the rootfs dockerd passes (`<data-root>/overlay2/<id>/merged`) after checking
the store records the container there, and under containerd alone asks
containerd for the container's labels (which `ctr run` copies from the image).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.engine import Engine, EngineError
from tests.harness.rootfs import File

pytestmark = pytest.mark.engine

GO_RUNTIME = Path(sys.executable).parent / "balena-extension-runtime"
HOOK = File('#!/bin/sh\necho "${0##*/} $EXTENSION_IMAGE_CLASS $(cat "$EXTENSION_ROOTFS/etc/ext-file")"'
            ' >> "$EXTENSION_VOLUME_EVIDENCE/steps"\n', 0o755)
FILES = {"hooks/create": HOOK, "hooks/start": HOOK, "etc/ext-file": "payload"}
DOCKERFILE = 'FROM scratch\n{labels}COPY . /\nCMD ["/never-run"]\n'


class Setup:
    def __init__(self, engine: Engine, tmp: Path) -> None:
        self.engine = engine
        self.tmp = tmp
        self.evidence = tmp / "evidence"
        self.evidence.mkdir()

    def steps(self, want: int) -> list[str]:
        path = self.evidence / "steps"
        deadline = time.monotonic() + 60
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= want or time.monotonic() > deadline:
                path.unlink(missing_ok=True)
                return lines
            time.sleep(0.05)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run dockerd")
    assert GO_RUNTIME.exists(), f"{GO_RUNTIME} missing: .venv/bin/pip install -e ."
    assert not any(k.startswith("MOBYNIT_RUNTIME") for k in os.environ)  # dockerd passes its env on to us
    tmp = tmp_path_factory.mktemp("runtime-dockerd")
    engine = Engine(tmp / "somewhere" / "else", ["--add-runtime", f"extension={GO_RUNTIME}"])
    s = Setup(engine, tmp)
    with engine:
        engine.build_many([
            ("ext:1", DOCKERFILE.format(labels="LABEL io.balena.image.class=overlay\n"), FILES),
            ("plain:1", DOCKERFILE.format(labels=""), FILES),
            ("volume:1", DOCKERFILE.format(labels="LABEL io.balena.image.class=volume\n"), FILES),
        ])
        yield s


def run(s: Setup, name: str, image: str) -> str:
    return s.engine.docker("run", "--name", name, "--runtime", "extension", "-v", f"{s.evidence}:/evidence", image)


def test_docker_run_finds_the_labels_on_any_data_root(setup: Setup) -> None:
    s = setup
    run(s, "ext-a", "ext:1")
    assert s.steps(2) == ["create overlay payload", "start overlay payload"]
    state = s.engine.inspect("ext-a")["State"]
    assert (state["Status"], state["ExitCode"], state["Error"]) == ("exited", 0, "")
    s.engine.docker("rm", "ext-a")


@pytest.mark.parametrize(("image", "why"), [
    ("plain:1", "missing required label io.balena.image.class"),
    ("volume:1", 'unsupported io.balena.image.class="volume", must be "overlay"'),
])
def test_refusals_name_the_label_and_where_they_looked(setup: Setup, image: str, why: str) -> None:
    s = setup
    name = image.partition(":")[0]
    with pytest.raises(EngineError) as err:
        run(s, name, image)
    cid = s.engine.inspect(name)["Id"]
    record = f"{s.engine.data_root}/containers/{cid}/config.v2.json"
    assert f"OCI runtime create failed: container {cid} is not an extension: {why} (looked in {record})" in str(err.value)
    assert s.engine.inspect(name)["State"]["Status"] == "created"
    s.engine.docker("rm", name)


def ctr(s: Setup, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ctr", "--address", str(s.engine.containerd_socket), "--namespace", "mobynit-alone", *args],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_containerd_alone_reads_the_image_labels(setup: Setup) -> None:
    """`ctr run` with no --annotation: the labels of the image config, through containerd's record."""
    s = setup
    for image in ("ext:1", "plain:1"):
        s.engine.docker("save", "-o", str(s.tmp / "img.tar"), image)
        ctr(s, "images", "import", str(s.tmp / "img.tar"))
    common = ["--runc-binary", str(GO_RUNTIME), "--runc-root", str(s.tmp / "ctr-root"),
              "--mount", f"type=bind,src={s.evidence},dst=/evidence,options=rbind:rw"]
    ctr(s, "run", "--rm", *common, "docker.io/library/ext:1", "ctr-ext")
    assert s.steps(2) == ["create overlay payload", "start overlay payload"]

    proc = ctr(s, "run", "--rm", *common, "docker.io/library/plain:1", "ctr-plain", check=False)
    assert proc.returncode != 0
    assert "container ctr-plain is not an extension: missing required label io.balena.image.class" in proc.stderr
    assert "containerd's record of ctr-plain in namespace mobynit-alone" in proc.stderr
    ctr(s, "containers", "rm", "ctr-plain", check=False)
    for image in ("ext:1", "plain:1"):
        ctr(s, "images", "rm", f"docker.io/library/{image}")
