"""The harness itself: devices have the store layout of reference.md §2, engines
coexist and clean up, and the mount-namespace fixture catches leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.harness import device as devices
from tests.harness import mounts
from tests.harness.engine import Engine, EngineError
from tests.harness.rootfs import busybox_tree
from mobynit.core import syscalls

HEX64 = re.compile(r"[0-9a-f]{64}")
LINK = re.compile(r"[A-Z0-9]{26}")


def read(path: Path) -> str:
    return path.read_text()


def config(store: Path, cid: str) -> dict:
    text = read(store / "containers" / cid / "config.v2.json")
    assert "\n" not in text.strip(), "config.v2.json is one line, as the engine writes it"
    return json.loads(text)


def layer_dirs(store: Path, cid: str) -> tuple[str, list[Path]]:
    """The container's mount-id and its lower layer dirs, top first, resolved through l/ links."""
    mount_id = read(store / "image/overlay2/layerdb/mounts" / cid / "mount-id")
    lower = read(store / "overlay2" / mount_id / "lower")
    dirs = []
    for entry in lower.split(":"):
        assert entry.startswith("l/") and LINK.fullmatch(entry[2:]), entry
        link = store / "overlay2" / entry
        target = os.readlink(link)
        assert re.fullmatch(r"\.\./[0-9a-f]{64}(-init)?/diff", target), target
        dirs.append((store / "overlay2" / entry).resolve())
    return mount_id, dirs


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


# --- the standard device -------------------------------------------------------------


def test_hostapp_layout(device: devices.StandardDevice) -> None:
    store = device.hostapp_store
    assert mounts.mounts_under(str(device.sysroot), str(device.data)) == [], "engines left mounts"
    current = device.sysroot / "current"
    assert os.readlink(current) == f"hostapps/{device.hostapp_id}"
    assert current.is_dir()
    assert HEX64.fullmatch(device.hostapp_id)

    cfg = config(store, device.hostapp_id)
    assert cfg["ID"] == device.hostapp_id
    assert cfg["Name"] == "/hostapp"
    assert cfg["Driver"] == "overlay2"
    assert cfg["Image"].startswith("sha256:")
    assert cfg["State"]["Dead"] is False and cfg["State"]["RemovalInProgress"] is False
    assert cfg["State"]["StartedAt"].startswith("0001-01-01"), "never started"

    mounts_dir = store / "image/overlay2/layerdb/mounts" / device.hostapp_id
    mount_id = read(mounts_dir / "mount-id")
    assert HEX64.fullmatch(mount_id)
    assert read(mounts_dir / "init-id") == f"{mount_id}-init"
    parent = read(mounts_dir / "parent")
    assert (store / "image/overlay2/layerdb/sha256" / parent.removeprefix("sha256:")).is_dir()

    _, dirs = layer_dirs(store, device.hostapp_id)
    assert len(dirs) == 1 + 3, "the -init layer, then the image's three layers"
    assert dirs[0] == (store / "overlay2" / f"{mount_id}-init" / "diff").resolve()
    assert (dirs[0] / ".dockerenv").exists()
    assert list((store / "overlay2" / mount_id / "diff").iterdir()) == [], "never started: empty diff"
    for d in dirs:
        assert len(read(d.parent / "link")) == 26
    for d in dirs[1:]:
        assert (d.parent / "committed").exists()

    top, middle, base = dirs[1:]
    assert (base / "bin/busybox").is_file() and os.readlink(base / "bin/sh") == "busybox"
    assert "VERSION_ID=7.0.0" in read(base / "etc/os-release")
    assert read(base / "etc/hostapp-file") == "hostapp\n"
    assert (base / "usr/share/hostapp/only-in-hostapp").is_file()
    assert (middle / "etc/to-delete").is_file()
    assert is_whiteout(top / "etc/to-delete"), "RUN rm leaves a 0/0 char device"


def test_layer_chain_metadata(device: devices.StandardDevice) -> None:
    """chainID = sha256(parent + ' ' + diffID); cache-id names the overlay2 dir."""
    store = device.hostapp_store
    layerdb = store / "image/overlay2/layerdb/sha256"
    chain = read(store / "image/overlay2/layerdb/mounts" / device.hostapp_id / "parent").removeprefix("sha256:")
    _, dirs = layer_dirs(store, device.hostapp_id)
    seen = []
    while True:
        entry = layerdb / chain
        seen.append(read(entry / "cache-id"))
        diff = read(entry / "diff")
        if not (entry / "parent").exists():
            assert chain == diff.removeprefix("sha256:")
            break
        parent = read(entry / "parent")
        assert chain == hashlib.sha256(f"{parent} {diff}".encode()).hexdigest()
        chain = parent.removeprefix("sha256:")
    assert seen == [d.parent.name for d in dirs[1:]]


def test_extensions(device: devices.StandardDevice) -> None:
    store = device.data_store
    expected = {e.name: e for e in devices.standard_extensions()}
    assert set(device.extensions) == set(expected)
    for name, cid in device.extensions.items():
        cfg = config(store, cid)
        assert cfg["Name"] == f"/{name}"
        labels = cfg["Config"]["Labels"] or {}
        assert labels == expected[name].labels
        if name == "ext-legacy":
            assert "io.balena.image.class" not in labels
            assert labels["io.balena.features.host-extension"] == "1"
        else:
            assert labels["io.balena.image.class"] == "overlay"
        assert cfg["State"]["Dead"] is (name == "ext-dead")
        assert cfg["State"]["RemovalInProgress"] is (name == "ext-removing")
        _, dirs = layer_dirs(store, cid)
        assert len(dirs) == 1 + len(expected[name].layers)
        assert (dirs[0] / ".dockerenv").is_file()

    def top(name: str, path: str) -> Path:
        return layer_dirs(store, device.extensions[name])[1][1] / path

    assert read(top("ext-normal", "etc/hostapp-file")) == "normal\n"
    assert read(top("ext-override", "etc/hostapp-file")) == "override10\n"
    assert read(top("ext-override5", "etc/hostapp-file")) == "override5\n"
    assert config(store, device.extensions["ext-override5"])["Config"]["Labels"]["io.balena.image.override"] == "5"
    assert top("ext-legacy", "usr/share/ext-legacy/hello").is_file()
    assert top("ext-kv-match", "usr/share/ext-kv-match/hello").is_file()

    symvers = top("ext-abi", "lib/modules/6.1.0-test/Module.symvers")
    assert hashlib.sha256(symvers.read_bytes()).hexdigest() == device.abi_id == devices.ABI_ID
    assert not top("ext-abi-nosymvers", "lib/modules/6.1.0-test/Module.symvers").exists()
    assert top("ext-abi-nosymvers", "lib/modules/6.1.0-test/kernel/x.ko").is_file()
    bad = config(store, device.extensions["ext-abi-badlabel"])["Config"]["Labels"]
    assert bad["io.balena.image.kernel-abi-id"] == device.wrong_abi_id != device.abi_id


def test_extension_whiteout_and_opaque_dir(device: devices.StandardDevice) -> None:
    _, dirs = layer_dirs(device.data_store, device.extensions["ext-whiteout"])
    upper, lower = dirs[1], dirs[2]
    base = "usr/share/ext-whiteout"
    assert (lower / base / "a").is_file() and (lower / base / "b").is_file()
    assert (lower / base / "opaque/old").is_file() and not is_opaque(lower / base / "opaque")
    assert is_whiteout(upper / base / "a")
    assert not (upper / base / "b").exists()
    assert is_opaque(upper / base / "opaque")
    assert sorted(p.name for p in (upper / base / "opaque").iterdir()) == ["new"]


def test_apps_and_marker(device: devices.StandardDevice) -> None:
    assert (device.data / "remove_me_to_reset").is_file()
    assert len(device.apps) == 3
    for n, cid in enumerate(device.apps, start=1):
        cfg = config(device.data_store, cid)
        assert cfg["Name"] == f"/app-{n:04d}"
        labels = cfg["Config"]["Labels"] or {}
        assert not any(k.startswith("io.balena") for k in labels)


def test_trees_hold_only_what_mkfs_can_copy(device: devices.StandardDevice) -> None:
    for root in (device.sysroot, device.data):
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                mode = os.lstat(os.path.join(dirpath, name)).st_mode
                ok = stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)
                ok = ok or (stat.S_ISCHR(mode) and os.lstat(os.path.join(dirpath, name)).st_rdev == 0)
                assert ok, f"{dirpath}/{name} has file type {stat.S_IFMT(mode):o}"


def test_mkfs_ext4_keeps_whiteouts_and_opaque_xattr(device: devices.StandardDevice, tmp_path: Path) -> None:
    """What the QEMU disk builder will do: mkfs.ext4 -d, then look inside with debugfs."""
    image = tmp_path / "data.ext4"
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "resin-data", "-d", str(device.data), str(image), "256M"]
    subprocess.run(mkfs, check=True)
    _, dirs = layer_dirs(device.data_store, device.extensions["ext-whiteout"])
    rel = dirs[1].relative_to(device.data)
    out = subprocess.run(
        ["debugfs", "-R", f"stat /{rel}/usr/share/ext-whiteout/a", str(image)], capture_output=True, text=True
    ).stdout
    assert "Type: character special" in out and "Device major/minor number: 00:00" in out
    out = subprocess.run(
        ["debugfs", "-R", f"ea_list /{rel}/usr/share/ext-whiteout/opaque", str(image)], capture_output=True, text=True
    ).stdout
    assert "trusted.overlay.opaque" in out and '"y"' in out


def test_device_copy_is_faithful(device: devices.StandardDevice, device_copy: devices.StandardDevice) -> None:
    assert device_copy.sysroot != device.sysroot
    assert device_copy.hostapp_id == device.hostapp_id and device_copy.abi_id == device.abi_id
    _, dirs = layer_dirs(device_copy.hostapp_store, device_copy.hostapp_id)
    assert all(str(d).startswith(str(device_copy.sysroot)) for d in dirs)
    assert is_whiteout(dirs[1] / "etc/to-delete")
    _, dirs = layer_dirs(device_copy.data_store, device_copy.extensions["ext-whiteout"])
    assert is_opaque(dirs[1] / "usr/share/ext-whiteout/opaque")
    assert os.readlink(device_copy.sysroot / "current") == f"hostapps/{device.hostapp_id}"


def test_onelayer_device(device_onelayer: devices.Device) -> None:
    store = device_onelayer.hostapp_store
    _, dirs = layer_dirs(store, device_onelayer.hostapp_id)
    assert len(dirs) == 2, "the -init layer and the one imported layer"
    assert read(dirs[1] / "etc/hostapp-file") == "onelayer\n"
    chain = read(store / "image/overlay2/layerdb/mounts" / device_onelayer.hostapp_id / "parent")
    assert not (store / "image/overlay2/layerdb/sha256" / chain.removeprefix("sha256:") / "parent").exists()
    assert device_onelayer.extensions == {} and device_onelayer.apps == ()
    assert (device_onelayer.data_store / "containers").is_dir()
    assert list((device_onelayer.data_store / "containers").iterdir()) == []


def test_build_path_opaque_dir_load_method_and_layer_rules(tmp_path: Path) -> None:
    """RUN rm -rf D && mkdir D in a docker build makes D opaque in that layer."""
    spec = devices.HostappSpec(
        name="os",
        layers=(
            devices.Layer(files={"opt/d/old": "old\n"}),
            devices.Layer(opaque=["opt/d"]),
            devices.Layer(files={"opt/d/new": "new\n"}),
        ),
        labels={"io.balena.image.class": "hostapp"},
    )
    exts = [
        devices.ExtensionSpec(f"x{n}", [devices.Layer(files={f"x{n}": f"{n}\n"})], labels={"n": str(n)})
        for n in range(3)
    ]
    dev = devices.build_device(tmp_path / "dev", spec, exts, apps=12, purge_marker=False, image_method="load")
    assert not (dev.data / "remove_me_to_reset").exists()
    for n in range(3):  # every extension image from one docker load
        cfg = config(dev.data_store, dev.extensions[f"x{n}"])
        assert cfg["Name"] == f"/x{n}" and cfg["Config"]["Labels"] == {"n": str(n)}
        assert read(layer_dirs(dev.data_store, dev.extensions[f"x{n}"])[1][1] / f"x{n}") == f"{n}\n"
    assert [config(dev.data_store, cid)["Name"] for cid in dev.apps] == [f"/app-{n:04d}" for n in range(1, 13)]
    _, dirs = layer_dirs(dev.hostapp_store, dev.hostapp_id)
    new, opaque, base = dirs[1:]
    assert (base / "opt/d/old").is_file()
    assert is_opaque(opaque / "opt/d") and list((opaque / "opt/d").iterdir()) == []
    assert (new / "opt/d/new").is_file()
    assert config(dev.hostapp_store, dev.hostapp_id)["Config"]["Labels"] == {"io.balena.image.class": "hostapp"}

    mixed = devices.HostappSpec(layers=(devices.Layer(), devices.Layer(files={"a": "a"}, delete=["b"])))
    with pytest.raises(ValueError, match="split it"):
        devices.build_device(tmp_path / "mixed", mixed)


# --- engines ---------------------------------------------------------------------------


def _containerd_pids(engine: Engine) -> list[int]:
    return [p for p in engine._own_processes() if b"containerd" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_two_engines_at_once(tmp_path: Path) -> None:
    docker_sock = Path("/var/run/docker.sock")
    before = docker_sock.lstat().st_mtime_ns if docker_sock.exists() else None
    a, b = Engine(tmp_path / "a"), Engine(tmp_path / "b")
    try:
        a.start(wait=False)
        b.start(wait=False)
        a.wait_ready()
        b.wait_ready()
        assert a.api("GET", "/_ping") == "OK" and b.api("GET", "/_ping") == "OK"
        assert a.containerd_socket != b.containerd_socket
        assert a.containerd_socket.is_socket() and b.containerd_socket.is_socket()
        for e in (a, b):
            pids = _containerd_pids(e)
            assert len(pids) == 1, "each engine runs its own containerd"
            assert str(e.exec_root).encode() in Path(f"/proc/{pids[0]}/cmdline").read_bytes()
        tree = busybox_tree(tmp_path / "tree")
        a.import_tree(tree, "only-in-a:1", {"k": "v"})
        assert a.inspect("only-in-a:1")["Config"]["Labels"] == {"k": "v"}
        assert b.api("GET", "/images/json") == []
        a_pids, b_pids = a._own_processes(), b._own_processes()
    finally:
        a.stop()
        b.stop()
    assert not [p for p in a_pids + b_pids if Path(f"/proc/{p}").exists()]
    assert mounts.mounts_under(str(tmp_path)) == []
    after = docker_sock.lstat().st_mtime_ns if docker_sock.exists() else None
    assert after == before, "engines must not touch /var/run/docker.sock"


def test_engine_runs_containers_and_stop_reaps_them(tmp_path: Path) -> None:
    from tests.harness.engine import _alive

    engine = Engine(tmp_path / "root").start()
    try:
        engine.import_tree(busybox_tree(tmp_path / "tree"), "bb:1")
        assert engine.docker("run", "--rm", "bb:1", "/bin/echo", "hello") == "hello\n"
        engine.docker("run", "-d", "--name", "sleeper", "bb:1", "/bin/sleep", "600")
        assert any(m.mount_point.endswith("/merged") for m in mounts.mounts_under(str(engine.data_root)))
        own = engine._own_processes()
        assert len(own) >= 3, "dockerd, containerd and the sleeper's shim"
        sleeper = engine.inspect("sleeper")["State"]["Pid"]
        assert _alive(sleeper)
    finally:
        engine.stop()
    assert not [p for p in own + [sleeper] if _alive(p)]
    assert mounts.mounts_under(str(tmp_path)) == []


def test_the_engine_rewrites_every_config_when_it_starts(tmp_path: Path) -> None:
    """Why no summary of a container's config can skip reading it at boot (docs/benchmark.md):
    each engine start writes every config.v2.json anew (a new file renamed over the old one),
    so anything keyed to the file (inode, ctime) is stale at every boot after the first."""
    def keys(cid: str) -> tuple[int, int, int]:
        st = (engine.data_root / "containers" / cid / "config.v2.json").stat()
        return st.st_ino, st.st_ctime_ns, st.st_size

    engine = Engine(tmp_path / "root").start()
    try:
        engine.import_tree(busybox_tree(tmp_path / "tree"), "bb:1")
        cids = [engine.create("bb:1", f"c{n}") for n in range(3)]
        before = {cid: keys(cid) for cid in cids}
    finally:
        engine.stop()
    engine.start()
    try:
        after = {cid: keys(cid) for cid in cids}
    finally:
        engine.stop()
    for cid in cids:
        # The inode may come back: the old file's is free again once the new one is renamed over it,
        # and the file system may hand it to the next file made. The change time always moves.
        assert after[cid][1] > before[cid][1], "a config left as it was"
        assert after[cid][2] == before[cid][2]


def test_engine_in_its_own_namespace(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "root", own_namespace=True).start()
    try:
        engine.import_tree(busybox_tree(tmp_path / "tree"), "bb:1")
        engine.docker("run", "-d", "bb:1", "/bin/sleep", "600")
        pid = engine.process.pid if engine.process else 0
        theirs = [m.mount_point for m in mounts.mountinfo(pid)]
        assert str(engine.data_root) in theirs
        assert any(p.startswith(str(engine.data_root)) and p.endswith("/merged") for p in theirs)
        assert mounts.mounts_under(str(tmp_path)) == [], "the caller sees none of the engine's mounts"
    finally:
        engine.stop()


def test_engine_errors_are_readable(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown flag"):
        Engine(tmp_path / "bad", ["--no-such-flag"]).start()
    with Engine(tmp_path / "e") as engine:
        with pytest.raises(EngineError, match="docker build .* failed"):
            engine.build("broken:1", "FROM no-such-image\n")
        with pytest.raises(EngineError, match="404"):
            engine.api("GET", "/containers/nope/json")


def test_engine_stop_unmounts_leftovers(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "root").start()
    # Under the exec-root: dockerd itself detaches its data-root bind mount (and
    # what is below) on shutdown, but nothing under the exec-root.
    target = engine.exec_root / "leftover"
    target.mkdir()
    syscalls.mount("tmpfs", str(target), "tmpfs")
    private = engine.private_dir
    engine.stop()
    assert mounts.mounts_under(str(tmp_path), str(private)) == []
    assert engine.process is None and engine.private_dir is None


def test_engine_stop_cleans_up_in_the_namespace_it_started_in(tmp_path: Path) -> None:
    # stop_timeout=0: dockerd is SIGKILLed and cannot undo its own data-root bind
    # mount, so stop() must go back to the namespace dockerd ran in to detach it.
    engine = Engine(tmp_path / "root", stop_timeout=0).start()
    assert [m.mount_point for m in mounts.mounts_under(str(tmp_path))] == [str(engine.data_root)]
    target = engine.data_root / "leftover"
    target.mkdir()
    syscalls.mount("tmpfs", str(target), "tmpfs")
    with mounts.PrivateNamespace():  # stop() is called from another namespace
        engine.stop()
    assert mounts.mounts_under(str(tmp_path)) == [], "stop() went back to the engine's namespace"


# --- the namespace fixture -------------------------------------------------------------------


def test_namespace_teardown_detaches_and_names_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    ns = mounts.PrivateNamespace().enter()
    syscalls.mount("tmpfs", str(target), "tmpfs")
    (target / "file").write_text("x")
    assert [m.mount_point for m in ns.leftovers()] == [str(target)]
    left = ns.leave()
    assert left == [str(target)]
    assert str(target) not in [m.mount_point for m in mounts.mountinfo()]
    assert not (target / "file").exists()


def test_namespace_teardown_is_quiet_when_clean(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    ns = mounts.PrivateNamespace().enter()
    assert ns.leave() == []
    assert os.getcwd() == str(tmp_path), "setns resets the cwd; leave() restores it"


def test_each_test_has_its_own_mount_namespace() -> None:
    ours = os.stat("/proc/self/ns/mnt").st_ino
    with mounts.PrivateNamespace():
        assert os.stat("/proc/self/ns/mnt").st_ino != ours
    assert os.stat("/proc/self/ns/mnt").st_ino == ours


def test_mountinfo_unescapes_paths(tmp_path: Path) -> None:
    target = tmp_path / "with space"
    target.mkdir()
    with mounts.PrivateNamespace() as ns:
        syscalls.mount("tmpfs", str(target), "tmpfs")
        assert [m.mount_point for m in ns.leftovers()] == [str(target)]
        mounts.unmount_under(str(target))
        assert ns.leftovers() == []
