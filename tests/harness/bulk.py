"""Devices with hundreds of extensions, built fast with the real engine.

`docker build` per extension takes about half a second; for 500 extensions
(the overlayfs layer limit) the images are instead written as one
docker-archive and loaded with a single `docker load` (harness.device.load_images),
then created through the engine's API. The engine still writes every byte of the store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from tests.harness.device import OVERLAY_CLASS, Device, HostappSpec, Layer, build_device, load_images
from tests.harness.engine import Engine


@attrs.frozen
class BulkImage:
    tag: str
    layers: tuple[Layer, ...]
    labels: Mapping[str, str] = attrs.field(factory=dict)


def extension_images(count: int, *, overrides_every: int = 0, layers: int = 1, prefix: str = "ext") -> list[BulkImage]:
    """`count` extensions, each adding /usr/share/<name>/hello in its own layer(s);
    every `overrides_every`-th one an override with its index as priority."""
    images = []
    for i in range(count):
        name = f"{prefix}-{i:04d}"
        labels = dict(OVERLAY_CLASS)
        if overrides_every and i % overrides_every == 0:
            labels["io.balena.image.override"] = str(i)
        stack = tuple(Layer(files={f"usr/share/{name}/layer{j}": f"{name} {j}\n"}) for j in range(layers))
        images.append(BulkImage(tag=f"{name}:latest", layers=stack, labels=labels))
    return images


def add_containers(data_store: Path, images: Sequence[BulkImage]) -> dict[str, str]:
    """Load the images into the store's engine and create one container per image (named after its tag)."""
    engine = Engine(data_store)
    try:
        engine.start()
        load_images(engine, [(image.tag, image.layers, image.labels) for image in images])
        ids = {}
        for image in images:
            name = image.tag.split(":")[0]
            ids[name] = engine.create_many(image.tag, [name])[0]
    finally:
        engine.stop()
    (data_store / "volumes" / "backingFsBlockDev").unlink(missing_ok=True)
    return ids


def build_bulk_device(
    workdir: str | os.PathLike[str], extensions: int, *, apps: int = 0, overrides_every: int = 0, layers: int = 1
) -> Device:
    """A small hostapp, `extensions` extension containers and `apps` ordinary ones."""
    hostapp = HostappSpec(
        layers=(
            Layer(files={"etc/os-release": "ID=balena-os\nVERSION_ID=7.0.0\n", "etc/hostapp-file": "hostapp\n"}),
            Layer(files={"usr/share/hostapp/second": "second\n"}),
        )
    )
    dev = build_device(workdir, hostapp, (), apps=apps)
    ids = add_containers(dev.data / "docker", extension_images(extensions, overrides_every=overrides_every, layers=layers))
    return attrs.evolve(dev, extensions=ids)
