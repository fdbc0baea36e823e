"""Build a balenaOS-layout device with the real engine.

A device is two directories, the contents of the two partitions:

    sysroot/            root partition (resin-rootA)
      balena/           data-root of the engine that built the hostapp
      hostapps/<cid>/
      current -> hostapps/<cid>
    data/               data partition (resin-data)
      docker/           data-root of the engine that built the extensions and apps
      remove_me_to_reset

As balena's image build does, each engine's data-root *is* the store: nothing
is copied or synthesised, the tests read what dockerd wrote. Containers are
created, never started. Everything in the trees is a plain file, directory,
symlink, 0/0 character device (whiteout) or xattr, so `mkfs.ext4 -d` can turn
each directory into a partition image.

How image layers are made (one `Layer` spec = exactly one image layer):
- the hostapp's first layer is a `docker import` of a tree (busybox unless
  `busybox=False`, plus the layer's files); each further layer is a step of one
  classic `docker build`: `COPY` for files, `RUN rm` for deletions (a real
  whiteout, written by the engine's overlay upper dir) and
  `RUN rm -rf D && mkdir D` for opaque directories (the kernel marks D
  opaque). A build-path layer may therefore hold files or deletions, not both.
- an extension without deletions is `docker build` FROM scratch with COPY and
  LABEL steps. An extension with deletions or opaque directories has no shell
  to RUN, so it is a layer archive with `.wh.` entries fed to `docker load`:
  the engine itself turns them into whiteouts and opaque xattrs, as it does
  for images pulled from a registry. There a layer may mix all three.

Dead and RemovalInProgress states cannot be requested from the engine: the
builder stops the engine and sets the flag in `containers/<id>/config.v2.json`,
which is where dockerd itself records it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Literal

import attrs

from tests.harness.engine import Engine
from tests.harness.rootfs import Dir, File, FileSpec, Symlink, busybox_tree, write_files

OVERLAY_CLASS = {"io.balena.image.class": "overlay"}
MARKER = "remove_me_to_reset"

State = Literal["Dead", "RemovalInProgress"] | None


def _paths(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Layer:
    """One image layer: files to add, paths to delete (whiteouts), directories made opaque."""

    files: Mapping[str, FileSpec] = attrs.field(factory=dict, converter=dict)
    delete: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    opaque: tuple[str, ...] = attrs.field(default=(), converter=_paths)

    @property
    def removes(self) -> bool:
        return bool(self.delete or self.opaque)


def _layers(value: Iterable[Layer]) -> tuple[Layer, ...]:
    layers = tuple(value)
    if not layers:
        raise ValueError("an image needs at least one layer")
    return layers


@attrs.frozen
class HostappSpec:
    name: str = "hostapp"
    layers: tuple[Layer, ...] = attrs.field(default=(Layer(),), converter=_layers)
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    busybox: bool = True


@attrs.frozen
class ExtensionSpec:
    name: str
    layers: tuple[Layer, ...] = attrs.field(converter=_layers)
    labels: Mapping[str, str] = attrs.field(factory=lambda: dict(OVERLAY_CLASS), converter=dict)
    state: State = attrs.field(default=None)

    @state.validator
    def _check_state(self, _attr: object, value: object) -> None:
        if value not in (None, "Dead", "RemovalInProgress"):
            raise ValueError(f"extension {self.name}: state must be None, 'Dead' or 'RemovalInProgress', not {value!r}")


@attrs.frozen
class Device:
    sysroot: Path
    data: Path
    hostapp_id: str
    hostapp_name: str
    extensions: Mapping[str, str]  # container name -> container id
    apps: tuple[str, ...]

    @property
    def hostapp_store(self) -> Path:
        return self.sysroot / "balena"

    @property
    def data_store(self) -> Path:
        return self.data / "docker"

    def config_path(self, container_id: str) -> Path:
        """config.v2.json of a container, whichever store holds it."""
        for store in (self.data_store, self.hostapp_store):
            path = store / "containers" / container_id / "config.v2.json"
            if path.exists():
                return path
        raise KeyError(f"no container {container_id} in {self.sysroot} or {self.data}")


# --- image building ------------------------------------------------------------


def _dockerfile_label(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "LABEL " + " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in sorted(labels.items())) + "\n"


def _rm_command(layer: Layer) -> str:
    steps = []
    for path in layer.delete:
        steps.append(f"rm -rf {_shq('/' + path.lstrip('/'))}")
    for path in layer.opaque:
        p = _shq("/" + path.lstrip("/"))
        steps.append(f"rm -rf {p} && mkdir -p {p}")
    return " && ".join(steps)


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def build_rooted_image(engine: Engine, tag: str, spec: HostappSpec, scratch: Path) -> str:
    """Import the first layer (busybox tree + files), then one build step per further layer."""
    first, rest = spec.layers[0], spec.layers[1:]
    if first.removes:
        raise ValueError(f"{spec.name}: the first layer is an imported tree and cannot delete anything")
    tree = scratch / f"{spec.name}-tree"
    if spec.busybox:
        busybox_tree(tree, first.files)
    else:
        tree.mkdir(parents=True)
        write_files(tree, first.files)
    if not rest:
        return engine.import_tree(tree, tag, spec.labels)
    base_tag = f"{spec.name}-base:build"
    engine.import_tree(tree, base_tag)
    lines = [f"FROM {base_tag}\n", _dockerfile_label(spec.labels)]
    files: dict[str, FileSpec] = {}
    for n, layer in enumerate(rest, start=1):
        if layer.files and layer.removes:
            raise ValueError(
                f"{spec.name}: layer {n} both adds files and deletes; in a docker build each is its own "
                "step (COPY, RUN rm), so split it into two Layer specs"
            )
        if layer.removes:
            if not spec.busybox:
                raise ValueError(f"{spec.name}: layer {n} deletes files, which needs busybox in the image to RUN rm")
            lines.append(f"RUN {_rm_command(layer)}\n")
        else:
            files.update({f"l{n}/{_rel(p)}": v for p, v in layer.files.items()})
            files.setdefault(f"l{n}", Dir())
            lines.append(f"COPY l{n}/ /\n")
    image = engine.build(tag, "".join(lines), files)
    engine.docker("rmi", base_tag)  # untag only: the layers stay, as the hostapp's parent
    return image


def scratch_dockerfile(layers: tuple[Layer, ...], labels: Mapping[str, str]) -> tuple[str, dict[str, FileSpec]]:
    """FROM scratch, LABEL, one COPY per layer: the Dockerfile and its context files."""
    if any(layer.removes for layer in layers):
        raise ValueError("a FROM scratch build has no shell to delete with; use load_image")
    lines = ["FROM scratch\n", _dockerfile_label(labels)]
    files: dict[str, FileSpec] = {}
    for n, layer in enumerate(layers):
        files.update({f"l{n}/{_rel(p)}": v for p, v in layer.files.items()})
        files.setdefault(f"l{n}", Dir())
        lines.append(f"COPY l{n}/ /\n")
    return "".join(lines), files


ImageMethod = Literal["build", "load"]


def build_scratch_images(
    engine: Engine, specs: Iterable[ExtensionSpec], method: ImageMethod = "build"
) -> dict[str, str]:
    """Image id per extension name.

    "build": parallel FROM-scratch `docker build`s, and one `docker load` for
    those that delete. "load": every image from one `docker load` (about ten
    times faster for many extensions; the store layout is the same).
    """
    if method not in ("build", "load"):
        raise ValueError(f"image method must be 'build' or 'load', not {method!r}")
    specs = tuple(specs)
    loaded = [s for s in specs if method == "load" or any(layer.removes for layer in s.layers)]
    built = [s for s in specs if not (method == "load" or any(layer.removes for layer in s.layers))]
    images: dict[str, str] = {}
    if loaded:
        ids = load_images(engine, [(f"{s.name}:latest", s.layers, s.labels) for s in loaded])
        images.update({s.name: i for s, i in zip(loaded, ids)})
    if built:
        ids = engine.build_many([(f"{s.name}:latest", *scratch_dockerfile(s.layers, s.labels)) for s in built])
        images.update({s.name: i for s, i in zip(built, ids)})
    return images


def _rel(path: str) -> str:
    rel = PurePosixPath(os.path.normpath("/" + path)).relative_to("/")
    if str(rel) in ("", "."):
        raise ValueError(f"{path!r} does not name a file")
    return str(rel)


def layer_tar(layer: Layer) -> bytes:
    """An OCI/docker layer archive: files, `.wh.NAME` deletions, `DIR/.wh..wh..opq` opaque dirs."""
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add_dirs(rel: str) -> None:
        parts = PurePosixPath(rel).parts[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in entries:
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                entries[d] = (info, None)

    def put(rel: str, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        add_dirs(rel)
        entries[rel] = (info, data)

    for path in layer.opaque:
        rel = _rel(path)
        info = tarfile.TarInfo(rel)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        put(rel, info)
        put(f"{rel}/.wh..wh..opq", tarfile.TarInfo(f"{rel}/.wh..wh..opq"), b"")
    for path in layer.delete:
        p = PurePosixPath(_rel(path))
        wh = str(p.parent / f".wh.{p.name}") if str(p.parent) != "." else f".wh.{p.name}"
        put(wh, tarfile.TarInfo(wh), b"")
    for path, spec in layer.files.items():
        rel = _rel(path)
        info = tarfile.TarInfo(rel)
        if isinstance(spec, Dir):
            info.type, info.mode = tarfile.DIRTYPE, spec.mode
            put(rel, info)
        elif isinstance(spec, Symlink):
            info.type, info.linkname = tarfile.SYMTYPE, spec.target
            put(rel, info)
        else:
            content, mode = (spec.content, spec.mode) if isinstance(spec, File) else (spec, 0o644)
            data = content.encode() if isinstance(content, str) else content
            info.mode = mode
            put(rel, info, data)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(entries):
            info, data = entries[rel]
            info.mtime = 0
            info.uid = info.gid = 0
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def load_image(engine: Engine, tag: str, layers: tuple[Layer, ...], labels: Mapping[str, str]) -> str:
    """`docker load` of a docker-archive holding one image made of `layers`; returns its id."""
    return load_images(engine, [(tag, layers, labels)])[0]


def load_images(
    engine: Engine, images: Iterable[tuple[str, tuple[Layer, ...], Mapping[str, str]]]
) -> list[str]:
    """One `docker load` of a docker-archive holding several images; their ids in order.

    Each Layer becomes one layer tar (shared between images when identical).
    """
    members: dict[str, bytes] = {}
    manifest = []
    ids = []
    for tag, layers, labels in images:
        tars = [layer_tar(layer) for layer in layers]
        digests = [hashlib.sha256(t).hexdigest() for t in tars]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": dict(labels), "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]},
            "history": [{"created_by": f"harness layer {n}"} for n in range(len(tars))],
        }
        config_bytes = json.dumps(config, sort_keys=True).encode()
        image_id = hashlib.sha256(config_bytes).hexdigest()
        members[f"{image_id}.json"] = config_bytes
        members.update({f"{d}/layer.tar": t for d, t in zip(digests, tars)})
        layer_names = [f"{d}/layer.tar" for d in digests]
        manifest.append({"Config": f"{image_id}.json", "RepoTags": [tag], "Layers": layer_names})
        ids.append(f"sha256:{image_id}")
    members["manifest.json"] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    engine.load(buf.getvalue())
    return ids


# --- the device ------------------------------------------------------------------


def set_state(config_path: Path, state: State) -> None:
    """Mark a container Dead or RemovalInProgress in its config.v2.json (engine stopped)."""
    if state is None:
        return
    doc = json.loads(config_path.read_text())
    doc["State"][state] = True
    config_path.write_text(json.dumps(doc, separators=(",", ":")))


def build_device(
    workdir: str | os.PathLike[str],
    hostapp: HostappSpec,
    extensions: Iterable[ExtensionSpec] = (),
    apps: int = 0,
    purge_marker: bool = True,
    *,
    engine_args: Iterable[str] = (),
    image_method: ImageMethod = "build",
) -> Device:
    """Build `workdir/sysroot` and `workdir/data` with two real engines, stopped on return.

    image_method="load" makes every extension image with one `docker load`
    (see build_scratch_images): for benchmarks with many extensions.
    """
    work = Path(workdir).absolute()
    sysroot, data = work / "sysroot", work / "data"
    for d in (sysroot, data):
        if d.exists():
            raise FileExistsError(f"{d} already exists; build_device wants a fresh work directory")
    extensions = tuple(extensions)
    names = [e.name for e in extensions] + [f"app-{n:04d}" for n in range(1, apps + 1)]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"container names used twice: {', '.join(sorted(dup))}")
    sysroot.mkdir(parents=True)
    data.mkdir(parents=True)

    with tempfile.TemporaryDirectory(prefix="mh-build-") as tmp:
        scratch = Path(tmp)
        # Own namespaces: nothing the engines mount is seen by the caller, even
        # when a build script runs outside the test suite's private namespace.
        host_engine = Engine(sysroot / "balena", engine_args, own_namespace=True)
        data_engine = Engine(data / "docker", engine_args, own_namespace=True)
        try:
            host_engine.start(wait=False)
            data_engine.start(wait=False)
            host_engine.wait_ready()
            data_engine.wait_ready()
            image = build_rooted_image(host_engine, f"{hostapp.name}:latest", hostapp, scratch)
            hostapp_id = host_engine.create(image, hostapp.name)

            images = build_scratch_images(data_engine, extensions, image_method)
            # Through the API, as balena's supervisor creates containers.
            ext_ids = {e.name: data_engine.create_many(images[e.name], [e.name])[0] for e in extensions}
            app_ids: list[str] = []
            if apps:
                app_image = data_engine.import_tree(busybox_tree(scratch / "app-tree"), "app:latest")
                app_ids = data_engine.create_many(app_image, [f"app-{n:04d}" for n in range(1, apps + 1)])
        finally:
            host_engine.request_stop()
            data_engine.request_stop()
            host_engine.stop()
            data_engine.stop()

    for store in (sysroot / "balena", data / "docker"):
        # The local volume driver leaves a block-device node of the host disk here
        # (for quotas) and recreates it at every start: not part of a device image.
        (store / "volumes" / "backingFsBlockDev").unlink(missing_ok=True)
    for ext in extensions:
        set_state(data / "docker" / "containers" / ext_ids[ext.name] / "config.v2.json", ext.state)
    (sysroot / "hostapps" / hostapp_id).mkdir(parents=True)
    (sysroot / "current").symlink_to(f"hostapps/{hostapp_id}")
    if purge_marker:
        (data / MARKER).write_text("")
    return Device(
        sysroot=sysroot,
        data=data,
        hostapp_id=hostapp_id,
        hostapp_name=hostapp.name,
        extensions=ext_ids,
        apps=tuple(app_ids),
    )


def copy_device(device: Device, dest: str | os.PathLike[str]) -> Device:
    """A copy to corrupt: `cp -a` keeps xattrs (opaque dirs), 0/0 char devices (whiteouts), symlinks."""
    target = Path(dest).absolute()
    target.mkdir(parents=True, exist_ok=True)
    for src, name in ((device.sysroot, "sysroot"), (device.data, "data")):
        if (target / name).exists():
            raise FileExistsError(f"{target / name} already exists")
        res = subprocess.run(
            ["cp", "-a", "--preserve=all", str(src), str(target / name)], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RuntimeError(f"cp -a {src} {target / name} failed: {res.stderr.strip()}")
    return attrs.evolve(device, sysroot=target / "sysroot", data=target / "data")



# --- the standard device of the test suite ------------------------------------------

KERNEL_RELEASE = "6.1.0-test"
MODULE_SYMVERS = b"0x12345678\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n0x9abcdef0\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n"
ABI_ID = hashlib.sha256(MODULE_SYMVERS).hexdigest()
WRONG_ABI_ID = hashlib.sha256(b"not the symvers\n").hexdigest()


def standard_hostapp() -> HostappSpec:
    """Three layers: busybox + files, /etc/to-delete added, then RUN rm'd (a whiteout)."""
    return HostappSpec(
        name="hostapp",
        layers=(
            Layer(
                files={
                    "etc/os-release": 'ID=balena-os\nNAME="balenaOS"\nVERSION_ID=7.0.0\n',
                    "etc/hostapp-file": "hostapp\n",
                    "usr/share/hostapp/only-in-hostapp": "only in hostapp\n",
                }
            ),
            Layer(files={"etc/to-delete": "delete me\n"}),
            Layer(delete=["etc/to-delete"]),
        ),
    )


def _ext(
    name: str, files: Mapping[str, FileSpec], labels: Mapping[str, str] | None = None, **kw: object
) -> ExtensionSpec:
    merged = {**OVERLAY_CLASS, **(labels or {})}
    return ExtensionSpec(name=name, layers=(Layer(files=files),), labels=merged, **kw)  # type: ignore[arg-type]


def standard_extensions() -> tuple[ExtensionSpec, ...]:
    """The extensions of the suite's standard device (see docs/harness.md for the table)."""
    hello = lambda name: {f"usr/share/{name}/hello": f"hello from {name}\n"}  # noqa: E731
    return (
        _ext("ext-normal", {**hello("ext-normal"), "etc/hostapp-file": "normal\n"}),
        _ext(
            "ext-override",
            {**hello("ext-override"), "etc/hostapp-file": "override10\n"},
            {"io.balena.image.override": "10"},
        ),
        _ext("ext-override5", {"etc/hostapp-file": "override5\n"}, {"io.balena.image.override": "5"}),
        ExtensionSpec(
            name="ext-legacy",
            layers=(Layer(files=hello("ext-legacy")),),
            labels={"io.balena.features.host-extension": "1"},
        ),
        ExtensionSpec(
            name="ext-whiteout",
            layers=(
                Layer(
                    files={
                        "usr/share/ext-whiteout/a": "a\n",
                        "usr/share/ext-whiteout/b": "b\n",
                        "usr/share/ext-whiteout/opaque/old": "old\n",
                    }
                ),
                Layer(
                    files={"usr/share/ext-whiteout/opaque/new": "new\n"},
                    delete=["usr/share/ext-whiteout/a"],
                    opaque=["usr/share/ext-whiteout/opaque"],
                ),
            ),
            labels=dict(OVERLAY_CLASS),
        ),
        _ext("ext-dead", hello("ext-dead"), state="Dead"),
        _ext("ext-removing", hello("ext-removing"), state="RemovalInProgress"),
        _ext("ext-kv-match", hello("ext-kv-match"), {"io.balena.image.kernel-version": "6.1.0"}),
        _ext("ext-kv-mismatch", hello("ext-kv-mismatch"), {"io.balena.image.kernel-version": "5.15.0"}),
        _ext(
            "ext-abi",
            {**hello("ext-abi"), f"lib/modules/{KERNEL_RELEASE}/Module.symvers": MODULE_SYMVERS},
            {"io.balena.image.kernel-abi-id": ABI_ID},
        ),
        _ext(
            "ext-abi-nosymvers",
            {**hello("ext-abi-nosymvers"), f"lib/modules/{KERNEL_RELEASE}/kernel/x.ko": b"\x7fELF not really\n"},
            {"io.balena.image.kernel-abi-id": ABI_ID},
        ),
        _ext(
            "ext-abi-badlabel",
            {**hello("ext-abi-badlabel"), f"lib/modules/{KERNEL_RELEASE}/Module.symvers": MODULE_SYMVERS},
            {"io.balena.image.kernel-abi-id": WRONG_ABI_ID},
        ),
    )


@attrs.frozen
class StandardDevice(Device):
    """The standard device, with the facts its kernel-filter extensions were built for."""

    kernel_release: str = KERNEL_RELEASE
    abi_id: str = ABI_ID  # sha256 of ext-abi's (and ext-abi-badlabel's) Module.symvers
    wrong_abi_id: str = WRONG_ABI_ID  # ext-abi-badlabel's label


def build_standard_device(workdir: str | os.PathLike[str]) -> StandardDevice:
    dev = build_device(workdir, standard_hostapp(), standard_extensions(), apps=3)
    return StandardDevice(**attrs.asdict(dev, recurse=False))


def build_onelayer_device(workdir: str | os.PathLike[str]) -> Device:
    """A hostapp that is a single `docker import` (one layer), an empty data store."""
    hostapp = HostappSpec(
        name="hostapp",
        layers=(Layer(files={"etc/os-release": "ID=balena-os\nVERSION_ID=7.0.0\n", "etc/hostapp-file": "onelayer\n"}),),
    )
    return build_device(workdir, hostapp, ())
