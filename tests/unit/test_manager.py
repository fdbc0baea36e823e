"""The extension manager's own rules, without an engine: what counts as garbage or stale,
the engine's answer as it is parsed, deactivate hooks, and request time limits."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mobynit.runtime import manager
from mobynit.core.errors import MobynitError
from mobynit.runtime.engine import EngineAPIError, EngineClient
from mobynit.runtime.manager import Candidate, System
from mobynit.core.model import KernelModules
from mobynit.runtime import RuntimeFailure

SYSTEM = System(kernel_release="6.1.0-9-amd64", abi_token=None, os_version="2.119.3")


def candidate(labels: dict[str, str] | None = None, status: str = "exited", error: str = "", **kw: object) -> Candidate:
    values = dict(id="c" * 64, name="ext", status=status, error=error,
                  labels={"io.balena.image.class": "overlay", **(labels or {})}, volumes=(), layers=())
    values.update(kw)
    return Candidate(**values)  # type: ignore[arg-type]


def no_modules(layers: object, release: str) -> None:
    return None


def test_garbage_is_dead_or_failed() -> None:
    assert manager.garbage_reason(candidate(status="dead")) == "the engine marked it dead"
    assert manager.garbage_reason(candidate(status="created", error="OCI runtime create failed: x")) == (
        "it failed: OCI runtime create failed: x")
    assert manager.garbage_reason(candidate(status="exited")) is None
    assert manager.garbage_reason(candidate(status="removing", error="x")) is None


@pytest.mark.parametrize(
    ("labels", "stale"),
    [
        ({}, False),
        ({"io.balena.image.kernel-version": "6.1.0"}, False),
        ({"io.balena.image.kernel-version": "6.1.1"}, True),
        ({"io.balena.image.os-version": "2.119.*"}, False),
        ({"io.balena.image.os-version": "2.118.*, 2.119.3"}, False),
        ({"io.balena.image.os-version": "2.118.*,3.*"}, True),
        ({"io.balena.image.os-version": " , "}, True),  # names no version: refused at boot too
    ],
)
def test_stale_by_labels(labels: dict[str, str], stale: bool) -> None:
    assert (manager.stale_reason(candidate(labels), SYSTEM, no_modules) is not None) == stale


def test_stale_by_kernel_abi(tmp_path: Path) -> None:
    """The ABI checks are the boot's: Module.symvers in the layers vs label and balena_kernel_abi=."""
    symvers = b"0x1\tsym\tvmlinux\tEXPORT_SYMBOL\n"
    digest = hashlib.sha256(symvers).hexdigest()
    layer = tmp_path / "layer"
    (layer / "lib/modules/6.1.0-9-amd64").mkdir(parents=True)
    (layer / "lib/modules/6.1.0-9-amd64/Module.symvers").write_bytes(symvers)
    c = candidate({"io.balena.image.kernel-abi-id": digest}, layers=(str(tmp_path / "upper"), str(layer)))
    (tmp_path / "upper").mkdir()
    from mobynit.core.layers import probe_modules

    assert manager.stale_reason(c, SYSTEM, probe_modules) is None
    assert manager.stale_reason(c, System(SYSTEM.kernel_release, digest, SYSTEM.os_version), probe_modules) is None
    other = System(SYSTEM.kernel_release, "f" * 64, SYSTEM.os_version)
    assert "does not match the running kernel's balena_kernel_abi=" in manager.stale_reason(c, other, probe_modules)
    wrong_label = candidate({"io.balena.image.kernel-abi-id": "0" * 64}, layers=c.layers)
    assert "disagrees with its Module.symvers" in manager.stale_reason(wrong_label, SYSTEM, probe_modules)
    probed = []
    manager.stale_reason(c, SYSTEM, lambda layers, rel: probed.append((tuple(layers), rel)))
    assert probed == [(c.layers, "6.1.0-9-amd64")]
    assert manager.stale_reason(c, SYSTEM, lambda *a: KernelModules("6.1.0-9-amd64", None)) is not None


def test_candidate_from_inspect() -> None:
    doc = {
        "Id": "a" * 64, "Name": "/ext-1",
        "State": {"Status": "exited", "Error": "", "ExitCode": 0},
        "Config": {"Labels": {"io.balena.image.class": "overlay"}},
        "Mounts": [
            {"Type": "volume", "Name": "v1", "Source": "/var/lib/docker/volumes/v1/_data", "Destination": "/boot"},
            {"Type": "bind", "Source": "/srv", "Destination": "/srv"},
        ],
        "GraphDriver": {"Data": {"UpperDir": "/o/c/diff", "LowerDir": "/o/c-init/diff:/o/l1/diff:/o/l2/diff",
                                 "MergedDir": "/o/c/merged"}, "Name": "overlay2"},
    }
    c = Candidate.from_inspect(doc)
    assert (c.id, c.name, c.status, c.error) == ("a" * 64, "ext-1", "exited", "")
    assert c.volumes == (manager.Volume("v1", "/var/lib/docker/volumes/v1/_data", "/boot"),)
    assert c.layers == ("/o/c/diff", "/o/c-init/diff", "/o/l1/diff", "/o/l2/diff")
    assert c.short == "ext-1 (aaaaaaaaaaaa)"
    odd = Candidate.from_inspect({"Id": "b", "Config": {"Labels": None}, "State": None, "Mounts": None})
    assert (odd.labels, odd.volumes, odd.layers, odd.status) == ({}, (), (), "")


def test_deactivate_runs_each_volumes_hook_with_the_hook_environment(tmp_path: Path) -> None:
    boot, data, bare = tmp_path / "boot", tmp_path / "data", tmp_path / "bare"
    for d in (boot, data, bare):
        d.mkdir()
    dump = f"#!{sys.executable}\nimport json, os\njson.dump(dict(os.environ), open(os.getcwd() + '/env', 'w'))\n"
    for d in (boot, data):
        (d / "deactivate").write_text(dump)
        (d / "deactivate").chmod(0o755)
    c = candidate({"io.balena.image.kernel-version": "1.2.3"}, volumes=(
        manager.Volume("b", str(boot), "/boot"), manager.Volume("d", str(data), "/data/my-vol"),
        manager.Volume("x", str(bare), "/bare")))
    lines: list[str] = []
    manager.deactivate(c, lines.append)
    env = json.loads((boot / "env").read_text())
    env.pop("LC_CTYPE", None)
    assert env == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EXTENSION_IMAGE_CLASS": "overlay",
                   "EXTENSION_IMAGE_KERNEL_VERSION": "1.2.3", "EXTENSION_VOLUME_BOOT": str(boot),
                   "EXTENSION_VOLUME_DATA_MY_VOL": str(data), "EXTENSION_VOLUME_BARE": str(bare)}
    assert (data / "env").exists() and not (bare / "env").exists()
    assert lines == [f"ext ({'c' * 12}): ran {boot}/deactivate", f"ext ({'c' * 12}): ran {data}/deactivate"]

    (data / "deactivate").write_text("#!/bin/sh\nexit 4\n")
    with pytest.raises(RuntimeFailure, match="deactivate failed with exit status 4"):
        manager.deactivate(c, lines.append)
    (data / "deactivate").chmod(0o644)
    with pytest.raises(RuntimeFailure, match="is not executable"):
        manager.deactivate(c, lines.append)


def test_read_os_version(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text('ID=balena-os\nVERSION_ID="2.119.3"\n')
    assert manager.read_os_version(str(f)) == "2.119.3"
    f.write_text("ID=balena-os\n")
    with pytest.raises(MobynitError, match="has no VERSION_ID"):
        manager.read_os_version(str(f))
    with pytest.raises(MobynitError, match="cannot read .*nope"):
        manager.read_os_version(str(tmp_path / "nope"))


def test_running_system_reads_the_abi_token(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("root=/dev/sda2 balena_kernel_abi=abc quiet\n")
    (tmp_path / "os-release").write_text("VERSION_ID=7.0.0\n")
    s = manager.running_system("6.1.0-x", str(tmp_path / "cmdline"), str(tmp_path / "os-release"))
    assert s == System("6.1.0-x", "abc", "7.0.0")
    (tmp_path / "cmdline").write_text("quiet\n")
    assert manager.running_system(None, str(tmp_path / "cmdline"), str(tmp_path / "os-release")).abi_token is None


def test_a_silent_engine_hits_the_time_limit(tmp_path: Path) -> None:
    """A socket that accepts connections (in the kernel's backlog) and never answers."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(8)
        client = EngineClient(path, timeout=0.3)
        with pytest.raises(EngineAPIError, match=r"GET /containers/json\?all=1 on .*silent.sock: no answer within 0.3 s"):
            client.containers()
    with pytest.raises(EngineAPIError, match="no such socket; is the engine running"):
        EngineClient(str(tmp_path / "none.sock")).containers()


def test_a_garbled_answer_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    path = str(tmp_path / "odd.sock")
    script = (
        "import socket, sys\n"
        f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); s.listen(1); print('ready', flush=True)\n"
        "c, _ = s.accept(); c.recv(65536)\n"
        "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\nContent-Type: application/json\\r\\n\\r\\n{oops')\n"
        "c.close()\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        with pytest.raises(EngineAPIError, match="answered 200 with a body that is not JSON"):
            EngineClient(path, timeout=30).containers()
    finally:
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "tcp://1.2.3.4:2375", "cleanup"], "is not unix:///path"),
        (["--timeout", "0", "cleanup"], "--timeout must be a positive number"),
        (["--host", "unix:///nonexistent/engine.sock", "cleanup"], "no such socket; is the engine running?"),
        (["--host", "unix:///nonexistent/engine.sock", "cleanup", "--stale-os", "--os-release", "/nonexistent/os"],
         "cannot read /nonexistent/os"),
    ],
)
def test_cli_errors_are_sentences(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mobynit.runtime.manager", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_usage_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "mobynit.runtime.manager", "cleanup", "--frob"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --frob" in proc.stderr and "Traceback" not in proc.stderr


class _Engine:
    """The engine's answers for one dead extension container; removals are recorded."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.removed: list[str] = []

    def containers(self) -> list[dict]:
        return [] if self.cid in self.removed else [{"Id": self.cid, "Labels": {"io.balena.image.class": "overlay"}}]

    def inspect(self, cid: str) -> dict:
        return {"Id": cid, "Name": "/ext", "State": {"Status": "dead"}, "Config": {"Labels": {"io.balena.image.class": "overlay"}}}

    def remove(self, cid: str) -> None:
        self.removed.append(cid)


def test_an_extension_the_running_root_is_made_with_is_never_removed() -> None:
    # Its layers are lower layers of the mounted root: removed now, / and /usr could no longer be
    # listed until the next boot. The oracle is the engine's record of what it was asked to remove.
    cid = "e" * 64
    said: list[str] = []
    engine = _Engine(cid)
    outcome = manager.cleanup(engine, False, None, said.append, mounted=frozenset({cid}))  # type: ignore[arg-type]
    assert engine.removed == [] and not outcome.removed
    assert said == [f"kept ext ({cid[:12]}): the engine marked it dead; but the running root is made with it:"
                    " it goes after the next boot"]
    manager.cleanup(engine, False, None, said.append)  # type: ignore[arg-type]
    assert engine.removed == [cid]


def test_the_running_root_is_read_from_the_boot_record(tmp_path: Path) -> None:
    from mobynit.core.record import BootRecord, Entry, Hostapp

    rec = BootRecord(hostapp=Hostapp(id="h" * 64, name="h", layers=()), extensions=(
        Entry(id="a" * 64, name="a", included=True, position="normal", priority=None, layers=1, reason=None, warning=None),
        Entry(id="b" * 64, name="b", included=False, position="normal", priority=None, layers=1, reason="x", warning=None),
    ), disabled_by=None, disabled_reason=None, kernel_release="6.1.0", page_size=4096, target="/", layout="flat",
        layout_reason=None, mechanism="mount", stacking_depth=1)
    rec.write(str(tmp_path / "boot.json"))
    said: list[str] = []
    assert manager.running_root(str(tmp_path / "boot.json"), lambda *a: said.append(a[0])) == frozenset({"a" * 64})
    assert manager.running_root(str(tmp_path / "none.json"), lambda *a: said.append(a[0])) == frozenset() and said == []
    (tmp_path / "bad.json").write_text("{")
    assert manager.running_root(str(tmp_path / "bad.json"), lambda *a: said.append(a[0])) == frozenset()
    assert len(said) == 1 and "cannot tell which extensions the running root uses" in said[0]
