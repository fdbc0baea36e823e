"""The bundle the engine hands over: its rootfs, the extension's labels and volumes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

from mobynit.core import labels as label
from mobynit.core.errors import StoreError, shown
from mobynit.core.fileio import read_file
from mobynit.core.model import Record
from mobynit.runtime import RuntimeFailure

DEFAULT_ENGINE_ROOT = "/var/lib/docker"
CONFIG_LIMIT = 4 << 20


def read_json(path: str, what: str, limit: int = CONFIG_LIMIT) -> dict:
    """A JSON object from the regular file `path` (never through a final
    symlink, at most `limit` bytes); RuntimeFailure naming the file otherwise."""
    try:
        raw = read_file(path, limit)
    except StoreError as e:
        raise RuntimeFailure(f"{what} {e}") from None
    return parse_json(raw, path, what)


def parse_json(raw: bytes, path: str, what: str) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RuntimeFailure(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RuntimeFailure(f"{what} {path} is not a JSON object")
    return doc


def string_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RuntimeFailure(f"{where} is not a map of strings")
    return dict(value)


def spec_volumes(spec: dict, config: str) -> dict[str, str]:
    """Every mount of the spec with an absolute destination (other than `/`): destination -> source.

    The hook contract of the tool we replace: EXTENSION_VOLUME_<DEST> for each
    such mount, whatever its type, so docker's named volumes and host binds
    (passed as bind mounts, `<data-root>/volumes/<name>/_data` for a volume)
    and the engine's own mounts (/proc, /dev, /etc/hosts...) alike.
    """
    mounts = spec.get("mounts")
    if mounts is None:
        return {}
    if not isinstance(mounts, list):
        raise RuntimeFailure(f"{config}: mounts is not a list")
    volumes: dict[str, str] = {}
    for m in mounts:
        if not isinstance(m, dict):
            raise RuntimeFailure(f"{config}: a mount is not an object")
        dest, source = m.get("destination"), m.get("source", "")
        if not isinstance(dest, str) or not isinstance(source, str):
            raise RuntimeFailure(f"{config}: mount {shown(dest)} has no destination, or a source that is not a string")
        if dest.startswith("/") and dest != "/":
            volumes[dest] = source
    return volumes


def resolve_rootfs(spec: dict, bundle: str, config: str) -> str:
    """The rootfs as an absolute path.

    A relative root.path (containerd's `rootfs`) must stay inside the bundle,
    symlinks resolved: `../../etc` or a planted `rootfs -> /` is refused. An
    absolute one is the engine's own statement and taken as it is: dockerd
    mounts the container itself and points at `<data-root>/overlay2/<id>/merged`.
    """
    root = spec.get("root")
    path = root.get("path") if isinstance(root, dict) else None
    if not isinstance(path, str) or not path:
        raise RuntimeFailure(f"{config}: root.path is missing")
    if os.path.isabs(path):
        rootfs = os.path.normpath(path)
    else:
        real_bundle = os.path.realpath(bundle)
        rootfs = os.path.realpath(os.path.join(real_bundle, path))
        if os.path.commonpath((real_bundle, rootfs)) != real_bundle:
            raise RuntimeFailure(
                f"{config}: root.path {shown(path)} resolves to {rootfs}, outside the bundle {real_bundle}"
            )
    if not os.path.isdir(rootfs):
        raise RuntimeFailure(f"{config}: rootfs {rootfs} is not a directory")
    return rootfs


# dockerd's rootfs for a container: <data-root>/overlay2/<mount-id>/merged
_MERGED = re.compile(r"(/.+)/overlay2/([0-9a-f]{64})/merged")


def derived_engine_root(root_path: str, cid: str) -> str | None:
    """The engine's data-root, read off the rootfs dockerd names, once checked.

    `root.path` = `<D>/overlay2/<mount-id>/merged` is believed only when `D`
    records this very container on that layer: its
    `image/overlay2/layerdb/mounts/<id>/mount-id` holds `<mount-id>`.
    """
    m = _MERGED.fullmatch(os.path.normpath(root_path)) if os.path.isabs(root_path) else None
    if m is None:
        return None
    root, mount_id = m.groups()
    try:
        recorded = read_file(f"{root}/image/overlay2/layerdb/mounts/{cid}/mount-id", 256)
    except StoreError:
        return None
    return root if recorded.strip() == mount_id.encode() else None


def engine_labels(engine_root: str, cid: str) -> dict[str, str] | None:
    """Config.Labels from the engine's `containers/<id>/config.v2.json`, None if it has no such file.

    dockerd does not copy a container's labels into the OCI annotations, so
    for it this is where an extension is recognised.
    """
    path = f"{engine_root}/containers/{cid}/config.v2.json"
    if not os.path.lexists(path):
        return None
    doc = read_json(path, "engine record")
    config = doc.get("Config")
    if not isinstance(config, dict):
        raise RuntimeFailure(f"{path}: Config is not an object")
    return string_map(config.get("Labels"), f"{path}: Config.Labels")


class Labels(Record):
    """The extension's labels, where they were found, and every place looked at."""

    __slots__ = ("labels", "source", "engine_root", "looked")
    labels: dict[str, str]
    source: str
    engine_root: str | None  # the engine store that recorded the container, if one did
    looked: tuple[str, ...]


def extension_labels(
    annotations: Mapping[str, str], engine_roots: Sequence[str], cid: str, bundle: str
) -> Labels:
    """The annotations when they carry balena labels; else the first engine
    store that records the container; else containerd's record of it (see
    mobynit.runtime.containerd); else the annotations, as they are."""
    looked = ["the OCI annotations"]
    if any(k.startswith("io.balena.") for k in annotations):
        return Labels(labels=dict(annotations), source=looked[0], engine_root=None, looked=tuple(looked))
    for root in engine_roots:
        labels = engine_labels(root, cid)
        path = f"{root}/containers/{cid}/config.v2.json"
        if labels is not None:
            return Labels(labels=labels, source=path, engine_root=root, looked=(*looked, path))
        looked.append(path)
    from mobynit.runtime import containerd

    labels, where = containerd.container_labels(bundle, cid)
    if labels is not None:
        return Labels(labels=labels, source=where, engine_root=None, looked=(*looked, where))
    looked.append(where)
    return Labels(labels=dict(annotations), source=looked[0], engine_root=None, looked=tuple(looked))


def refusal(labels: Mapping[str, str]) -> str | None:
    """Why these labels do not make an extension, in the words the engine shows
    users (and the tool we replace used): None for an extension."""
    if label.is_extension(labels):
        return None
    if label.CLASS in labels:
        return f"unsupported {label.CLASS}={json.dumps(labels[label.CLASS])}, must be \"overlay\""
    return f"missing required label {label.CLASS}"
