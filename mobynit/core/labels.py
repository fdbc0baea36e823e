"""The image labels mobynit reads, and what makes a container an extension.

Defined here once: the assembler, the store reader's cheap pre-filter, the
runtime and the manager all read the same names.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

PREFIX = "io.balena.image."  # every label of ours; the runtime passes them to hooks
CLASS = "io.balena.image.class"
LEGACY = "io.balena.features.host-extension"  # the original label, still honoured
KERNEL_VERSION = "io.balena.image.kernel-version"
KERNEL_ABI = "io.balena.image.kernel-abi-id"
OVERRIDE = "io.balena.image.override"
OS_VERSION = "io.balena.image.os-version"
REQUIRES_REBOOT = "io.balena.image.requires-reboot"  # "true": never merged live, only at the next boot

# Cheap byte-level test before parsing a container's JSON: the engine writes
# label keys verbatim, so a config without these bytes is not an extension.
MARKERS = (CLASS.encode(), LEGACY.encode())


def is_extension(labels: Mapping[str, str]) -> bool:
    """Labelled as an overlay extension, by the current or the original label."""
    if labels.get(CLASS) == "overlay":
        return True
    return labels.get(LEGACY, "").strip().lower() in ("1", "true")
