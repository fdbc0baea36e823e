"""In-memory records for the pure tests: what the store reader would return.

Nothing here touches the disk. Ids and `l/` links are derived from the
names by hashing, so the same call always gives the same record and two
different names never collide, which keeps the planner's tests deterministic.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping, Sequence

from mobynit.core import policy
from mobynit.core import labels as label
from mobynit.core.model import Container, Decision, Extension, KernelModules, Layer

HOSTAPP_OVERLAY2 = "/mnt/sysroot/active/balena/overlay2"
DATA_OVERLAY2 = "/mnt/data/docker/overlay2"


def hex_id(seed: str) -> str:
    """A 64-hex id, as the engine names containers and layers."""
    return hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()


def link_name(seed: str) -> str:
    """A 26-character `l/` alias in the engine's alphabet (upper case and digits)."""
    raw = hashlib.sha256(b"link:" + seed.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(raw).decode()[:26]


def layer(seed: str, overlay2: str = DATA_OVERLAY2, *, own: bool = False) -> Layer:
    """An image layer named by its `l/` link, or (own=True) a container's own diff."""
    lid = hex_id(f"layer:{seed}")
    return Layer(id=lid, path=f"{overlay2}/{lid}/diff", link=f"{lid}/diff" if own else f"l/{link_name(seed)}")


@functools.lru_cache(maxsize=4096)
def layers(seed: str, count: int, overlay2: str = DATA_OVERLAY2, *, own_diff: bool = False) -> tuple[Layer, ...]:
    """`count` layers, top first; the top one is the container's own diff when `own_diff`.

    Each seed gives its own layers (one hash per stack, so thousands stay cheap);
    two containers given the same seed share them, as images built FROM the same
    base share that base's layer directories in a real store.
    """
    lid, link = hex_id(f"layers:{seed}")[:48], link_name(seed)[:16]
    stack = [
        Layer(id=f"{lid}{i:016x}", path=f"{overlay2}/{lid}{i:016x}/diff", link=f"l/{link}{i:010d}") for i in range(count)
    ]
    if own_diff and stack:
        stack[0] = layer(f"{seed}/own", overlay2, own=True)
    return tuple(stack)


def container(
    name: str,
    *,
    nlayers: int = 2,
    labels: Mapping[str, str] | None = None,
    state: str | None = None,
    overlay2: str = DATA_OVERLAY2,
    own_diff: bool = False,
    cid: str | None = None,
    layer_seed: str | None = None,
    base: tuple[Layer, ...] = (),
) -> Container:
    """A container; `layer_seed` (default: its id) names its layers, so equal seeds
    share them; `base` goes below them, as the layers of the image it was built FROM."""
    cid = cid or hex_id(f"container:{name}")
    root = overlay2.rpartition("/")[0]
    return Container(
        id=cid,
        name=name,
        labels=dict(labels or {}),
        state=state,
        layers=layers(layer_seed or cid, nlayers, overlay2, own_diff=own_diff) + base,
        overlay2=overlay2,
        config=f"{root}/containers/{cid}/config.v2.json",
    )


def hostapp(*, nlayers: int = 3, overlay2: str = HOSTAPP_OVERLAY2, name: str = "balena_hostapp", own_diff: bool = False) -> Container:
    return container(name, nlayers=nlayers, overlay2=overlay2, own_diff=own_diff)


def ext_labels(override: int | str | None = None, **extra: str) -> dict[str, str]:
    """Labels of an extension; `override` sets io.balena.image.override."""
    labels = {label.CLASS: "overlay"}
    if override is not None:
        labels[label.OVERRIDE] = str(override)
    labels.update(extra)
    return labels


def extension(
    name: str,
    *,
    nlayers: int = 1,
    override: int | str | None = None,
    labels: Mapping[str, str] | None = None,
    state: str | None = None,
    modules: KernelModules | None = None,
    fault: str | None = None,
    overlay2: str = DATA_OVERLAY2,
    cid: str | None = None,
    own_diff: bool = False,
    layer_seed: str | None = None,
    base: tuple[Layer, ...] = (),
    release: Mapping[str, str] | None = None,
) -> Extension:
    """An extension container as the store reader returns it; with `fault`, an unreadable one.

    `release` is its parsed extension-release file (systemd-sysext), if it has one.
    """
    cid = cid or hex_id(f"container:{name}")
    if fault is not None:
        return Extension(id=cid, name=name, container=None, modules=None, fault=fault)
    all_labels = ext_labels(override)
    all_labels.update(labels or {})
    c = container(
        name, nlayers=nlayers, labels=all_labels, state=state, overlay2=overlay2, cid=cid, own_diff=own_diff, layer_seed=layer_seed,
        base=base,
    )
    extra = {} if release is None else {"release": dict(release)}
    return Extension(id=cid, name=name, container=c, modules=modules, fault=None, **extra)


def modules(release: str = "6.1.0-1-cloud-amd64", symvers: bytes | None = b"0x1234\tsym\tvmlinux\tEXPORT_SYMBOL\n") -> KernelModules:
    """What an extension ships under /lib/modules/<release>; symvers=None: no Module.symvers."""
    digest = None if symvers is None else hashlib.sha256(symvers).hexdigest()
    return KernelModules(release=release, symvers_sha256=digest)


def decisions(exts: Sequence[Extension], kernel_release: str = "6.1.0-1-cloud-amd64", abi: str | None = None) -> list[Decision]:
    """The policy's decisions for these extensions, in mount order."""
    return policy.select(exts, kernel_release, abi)
