"""The bundle the engine hands over: its rootfs, the extension's labels and volumes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from mobynit.core.errors import StoreError, shown
from mobynit.core.fileio import read_file
from mobynit.runtime import RuntimeFailure

DEFAULT_ENGINE_ROOT = "/var/lib/docker"
# Bind mounts the engine adds to every container; they are not the extension's volumes.
ENGINE_PLUMBING = frozenset(("/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/dev/shm"))
CONFIG_LIMIT = 4 << 20


def read_json(path: str, what: str, limit: int = CONFIG_LIMIT) -> dict:
    """A JSON object from the regular file `path` (never through a final
    symlink, at most `limit` bytes); RuntimeFailure naming the file otherwise."""
    try:
        raw = read_file(path, limit)
    except StoreError as e:
        raise RuntimeFailure(f"{what} {e}") from None
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
    """The extension's volumes: the bind mounts of the spec other than the engine's own.

    Docker hands named volumes and host binds to the runtime as bind mounts
    (`/var/lib/docker/volumes/<name>/_data` for a volume); the engine adds
    resolv.conf, hostname, hosts and /dev/shm to every container.
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
        dest, source, options = m.get("destination"), m.get("source"), m.get("options") or []
        if not isinstance(dest, str) or not isinstance(source, str) or not isinstance(options, list):
            raise RuntimeFailure(f"{config}: mount {shown(dest)} has no destination or source")
        bind = m.get("type") == "bind" or "bind" in options or "rbind" in options
        if bind and dest.startswith("/") and os.path.normpath(dest) not in ENGINE_PLUMBING:
            volumes[os.path.normpath(dest)] = source
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


def extension_labels(annotations: Mapping[str, str], engine_root: str, cid: str) -> tuple[dict[str, str], str]:
    """(labels, where they came from): the annotations when they carry balena
    labels, else the engine's record of the container, else the annotations."""
    if any(k.startswith("io.balena.") for k in annotations):
        return dict(annotations), "the OCI annotations"
    labels = engine_labels(engine_root, cid)
    if labels is not None:
        return labels, f"{engine_root}/containers/{cid}/config.v2.json"
    return dict(annotations), "the OCI annotations"
