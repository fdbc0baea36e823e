"""The extension runtime under the real engine: Debian's dockerd and containerd call it.

dockerd is started with `--add-runtime extension=<wrapper>`, the wrapper
recording each call's arguments before it execs the installed
`mobynit-runtime` console script, so the tests also pin down how the shim
really calls us.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.engine import Engine, EngineError
from tests.harness.rootfs import File
from mobynit.runtime import cli

pytestmark = pytest.mark.engine

RUNTIME = Path(sys.executable).parent / "mobynit-runtime"
HOOK = File(
    '#!/bin/sh\n'
    'ok=no; test "$(cat "$EXTENSION_ROOTFS/etc/ext-file")" = payload && ok=yes\n'
    'echo "${0##*/} class=$EXTENSION_IMAGE_CLASS rootfs=$ok" >> "$EXTENSION_VOLUME_EVIDENCE/steps"\n',
    0o755,
)
EXTENSION_FILES = {"hooks/create": HOOK, "hooks/start": HOOK, "hooks/delete": HOOK, "etc/ext-file": "payload"}
EXTENSION_DOCKERFILE = 'FROM scratch\n{labels}COPY . /\nCMD ["/never-run"]\n'


class Setup:
    def __init__(self, engine: Engine, tmp: Path) -> None:
        self.engine = engine
        self.tmp = tmp
        self.calls = tmp / "calls.log"
        self.evidence = tmp / "evidence"
        self.evidence.mkdir()
        self.wrapper = tmp / "extension-runtime"

    def steps(self, want: int | None = None) -> list[str]:
        """The hook evidence, waiting (up to a minute) until `want` lines are there:
        dockerd deletes the task, and so calls our delete, just after `docker run` returns."""
        path = self.evidence / "steps"
        deadline = time.monotonic() + 60
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if want is None or len(lines) >= want or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def reset(self) -> None:
        (self.evidence / "steps").unlink(missing_ok=True)

    def calls_for(self, cid: str) -> list[list[str]]:
        return [line.split() for line in self.calls.read_text().splitlines() if line.split()[-1:] == [cid]]


def wrapper(path: Path, calls: Path, engine_root: Path) -> None:
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> "{calls}"\n'
        f'export {cli.ENGINE_ROOT_ENV}="{engine_root}"\n'
        f'exec "{RUNTIME}" "$@"\n'
    )
    path.chmod(0o755)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run dockerd")
    assert RUNTIME.exists(), f"{RUNTIME} is missing: run .venv/bin/pip install -e ."
    tmp = tmp_path_factory.mktemp("runtime-engine")
    data = tmp / "data"
    # `extension` finds labels in this engine's store; `extension-nostore` looks in an empty one.
    engine = Engine(data, ["--add-runtime", f"extension={tmp / 'extension-runtime'}",
                           "--add-runtime", f"extension-nostore={tmp / 'nostore-runtime'}"])
    s = Setup(engine, tmp)
    wrapper(s.wrapper, s.calls, data)
    (tmp / "empty").mkdir()
    wrapper(tmp / "nostore-runtime", s.calls, tmp / "empty")
    with engine:
        engine.build_many([
            ("ext:1", EXTENSION_DOCKERFILE.format(labels="LABEL io.balena.image.class=overlay\n"), EXTENSION_FILES),
            ("plain:1", EXTENSION_DOCKERFILE.format(labels=""), EXTENSION_FILES),
            ("badhook:1", EXTENSION_DOCKERFILE.format(labels="LABEL io.balena.image.class=overlay\n"),
             {**EXTENSION_FILES, "hooks/create": File("#!/bin/sh\necho refusing >&2\nexit 3\n", 0o755)}),
        ])
        yield s


def run_extension(s: Setup, name: str, image: str = "ext:1", runtime_name: str = "extension", *extra: str) -> str:
    return s.engine.docker("run", "--name", name, "--runtime", runtime_name, *extra,
                           "-v", f"{s.evidence}:/evidence", image)


def test_docker_run_installs_the_extension_and_it_shows_exited_0(setup: Setup) -> None:
    s = setup
    s.reset()
    run_extension(s, "ext-a")
    cid = s.engine.inspect("ext-a")["Id"]
    steps = ["create class=overlay rootfs=yes", "start class=overlay rootfs=yes", "delete class=overlay rootfs=yes"]
    assert s.steps(3) == steps
    assert s.engine.docker("ps", "-a", "--filter", "name=ext-a", "--format", "{{.Status}}").startswith("Exited (0)")
    state = s.engine.inspect("ext-a")["State"]
    assert (state["Status"], state["ExitCode"], state["Error"]) == ("exited", 0, "")
    # create recorded the layers' facts, so the next boot can mount it in a flat root.
    from mobynit.core import facts
    from mobynit.core import store

    layers = store.Store(str(s.engine.data_root)).layers(cid)
    assert layers and all(facts.load(os.path.dirname(layer.path), layer.id) is not None for layer in layers)

    # How containerd's runc shim called us, verbatim.
    calls = s.calls_for(cid)
    commands = [c[c.index("json") + 1] for c in calls]
    assert commands == ["create", "start", "delete", "delete"]
    create = calls[0]
    root = create[create.index("--root") + 1]
    assert create[:2] == ["--root", root] and create[2] == "--log" and create[4:6] == ["--log-format", "json"]
    assert create[6:8] == ["create", "--bundle"] and create[9] == "--pid-file" and create[-1] == cid
    assert calls[3][-3:] == ["delete", "--force", cid]
    assert not Path(root, cid).exists() and not Path(root, f"{cid}.lock").exists()

    # The engine deleted the task when the container exited: that ran the delete
    # hook. `docker rm` does not call the runtime at all.
    s.engine.docker("rm", "ext-a")
    assert s.calls_for(cid) == calls
    assert s.steps() == steps


def test_docker_start_again_reinstalls(setup: Setup) -> None:
    s = setup
    run_extension(s, "ext-b")
    s.steps(3)
    s.reset()
    s.engine.docker("start", "-a", "ext-b")
    assert [line.split()[0] for line in s.steps(3)] == ["create", "start", "delete"]
    assert s.engine.inspect("ext-b")["State"]["ExitCode"] == 0
    s.engine.docker("rm", "ext-b")


def test_a_terminal_is_handed_to_the_shim(setup: Setup) -> None:
    s = setup
    s.reset()
    run_extension(s, "ext-tty", "ext:1", "extension", "-t")
    assert [line.split()[0] for line in s.steps(3)] == ["create", "start", "delete"]
    assert s.engine.inspect("ext-tty")["State"]["ExitCode"] == 0
    s.engine.docker("rm", "ext-tty")


def test_a_container_without_the_label_fails_with_the_runtimes_message(setup: Setup) -> None:
    s = setup
    s.reset()
    with pytest.raises(EngineError) as err:
        run_extension(s, "plain", "plain:1")
    cid = s.engine.inspect("plain")["Id"]
    assert (f"OCI runtime create failed: container {cid} is not an extension: missing required label"
            " io.balena.image.class" in str(err.value))
    assert f"{s.engine.data_root}/containers/{cid}/config.v2.json" in str(err.value)
    assert s.steps() == []
    state = s.engine.inspect("plain")["State"]
    assert state["Status"] == "created" and "is not an extension" in state["Error"]
    s.engine.docker("rm", "plain")


def test_labels_come_from_the_engine_store_even_when_told_the_wrong_one(setup: Setup) -> None:
    """dockerd passes no labels in the OCI annotations. `extension-nostore` is told an empty
    engine root: the runtime looks there first, then in the data-root dockerd's rootfs path shows."""
    s = setup
    s.reset()
    run_extension(s, "ext-nostore", "ext:1", "extension-nostore")
    assert [line.split()[0] for line in s.steps(3)] == ["create", "start", "delete"]
    s.engine.docker("rm", "ext-nostore")


def test_a_failing_create_hook_fails_docker_run(setup: Setup) -> None:
    s = setup
    s.reset()
    with pytest.raises(EngineError) as err:
        run_extension(s, "badhook", "badhook:1")
    assert "OCI runtime create failed: hook " in str(err.value)
    assert "/hooks/create failed with exit status 3" in str(err.value)
    state = s.engine.inspect("badhook")["State"]
    assert state["Status"] == "created" and "exit status 3" in state["Error"]
    s.engine.docker("rm", "badhook")


def ctr(s: Setup, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ctr", "--address", str(s.engine.containerd_socket), "--namespace", "mobynit-test", *args],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_containerd_ctr_run_with_runc_binary(setup: Setup) -> None:
    """Debian's containerd (the engine's own, in a namespace of ours) and `ctr run --runc-binary`:
    labels as OCI annotations, containerd's relative `rootfs` in the bundle."""
    s = setup
    archive = s.tmp / "ext.tar"
    s.engine.docker("save", "-o", str(archive), "ext:1")
    ctr(s, "images", "import", str(archive))
    image = "docker.io/library/ext:1"
    common = ["--runc-binary", str(s.wrapper), "--runc-root", str(s.tmp / "ctr-root"), "--fifo-dir", str(s.tmp / "fifo"),
              "--mount", f"type=bind,src={s.evidence},dst=/evidence,options=rbind:rw"]
    s.reset()
    ctr(s, "run", "--rm", *common, "--annotation", "io.balena.image.class=overlay", image, "ctr-ext")
    assert [line.split()[0] for line in s.steps(3)] == ["create", "start", "delete"]
    assert "rootfs=yes" in s.steps()[0]
    assert ctr(s, "containers", "list", "-q").stdout.split() == []
    assert os.listdir(s.tmp / "ctr-root" / "mobynit-test") == []  # containerd adds the namespace

    # Without the annotation: the image's labels, from containerd's record (tests/engine/test_runtime_dockerd.py).
    s.reset()
    ctr(s, "run", "--rm", *common, image, "ctr-image-labels")
    assert [line.split()[0] for line in s.steps(3)] == ["create", "start", "delete"]
    ctr(s, "images", "rm", image)
