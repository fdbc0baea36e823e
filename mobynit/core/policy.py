"""Which extensions go into the root, and where: pure functions over data.

Nothing here touches the disk. The store reader has already turned each
extension container into an `Extension` (with a `fault` if it was unreadable,
and what it ships under /lib/modules for the running kernel); this module
decides, and sorts the decisions into the order the mount stacks them.
"""

from __future__ import annotations

from mobynit.core import labels as label
from mobynit.core.errors import shown
from mobynit.core.model import NORMAL, OVERRIDE, SYSEXT, Decision, Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from mobynit.core.model import Extension, KernelModules

CMDLINE_ABI = "balena_kernel_abi"
CMDLINE_STRICT_OS_VERSION = "mobynit.strict_os_version"


class Host(Record):
    """What the compatibility gates compare an extension with: the hostapp's
    os-release, this machine's architecture (systemd's naming), and whether an
    os-version mismatch skips the extension or only warns."""

    __slots__ = ("os_release", "architecture", "strict_os_version")
    os_release: Mapping[str, str]
    architecture: str
    strict_os_version: bool


def kernel_verdict(
    labels: Mapping[str, str], modules: KernelModules | None, kernel_release: str, abi_token: str | None,
    *, unverified_ok: bool = False,
) -> str | None:
    """Why this extension does not suit the running kernel, or None if it does.

    The kernel-version label must equal the release cut at its first "-".
    The ABI check applies only to an extension that ships modules for the
    running release: those need a Module.symvers, whose sha256 is the
    extension's ABI id; a kernel-abi-id label must agree with it, and
    `balena_kernel_abi=` on the command line must name it. Without that
    parameter the ABI cannot be checked and the extension stays out (fail
    closed), unless `unverified_ok` (the manager: an extension that cannot be
    checked today is not proved stale). Modules for other releases are never
    loaded, so they cannot hurt and do not count.
    """
    wanted = labels.get(label.KERNEL_VERSION)
    running = kernel_release.partition("-")[0]
    if wanted is not None and wanted != running:
        return f"built for kernel {shown(wanted, 40)}, running kernel is {running}"
    if modules is None:
        return None
    if modules.symvers_sha256 is None:
        return f"ships modules for {modules.release} without a Module.symvers"
    computed = modules.symvers_sha256
    claimed = labels.get(label.KERNEL_ABI)
    if claimed is not None and claimed != computed:
        return f"label {label.KERNEL_ABI}={shown(claimed, 70)} disagrees with its Module.symvers (sha256 {computed})"
    if abi_token is None:
        if unverified_ok:
            return None
        return (f"ships modules for {modules.release} whose ABI cannot be checked: no {CMDLINE_ABI}= on the kernel"
                f" command line (add {CMDLINE_ABI}=<sha256 of the running kernel's Module.symvers>; this"
                f" extension's is {computed})")
    if abi_token != computed:
        return f"kernel ABI {computed} does not match the running kernel's {CMDLINE_ABI}={shown(abi_token, 70)}"
    return None


def _integer(text: str) -> int | None:
    """A plain decimal integer, optionally signed; nothing int() would also take ("1_0", " 3", "٣")."""
    digits = text[1:] if text[:1] in ("-", "+") else text
    if digits and digits.isascii() and digits.isdigit() and len(digits) <= 18:
        return int(text)
    return None


def placement(labels: Mapping[str, str]) -> tuple[str, int | None, str | None]:
    """(position, priority, warning): overrides sit left of the hostapp, others right."""
    raw = labels.get(label.OVERRIDE)
    if raw is None:
        return NORMAL, None, None
    priority = _integer(raw)
    if priority is None:
        return OVERRIDE, None, f"{label.OVERRIDE}={shown(raw, 40)} is not an integer; sorted after the other overrides"
    return OVERRIDE, priority, None


def order_key(decision: Decision) -> tuple[int, int, int, str, str]:
    """Mount order, top first: overrides by ascending priority (non-integers
    last), then sysext images by rank (the highest version on top, as
    systemd-sysext stacks them), then normal extensions; by name within a
    group, the id settles the rest."""
    ext = decision.extension
    if decision.position == OVERRIDE:
        unranked = decision.priority is None
        return (0, int(unranked), 0 if unranked else decision.priority, ext.name, ext.id)  # type: ignore[return-value]
    if decision.position == SYSEXT:  # refused images (no rank) after the ranked ones
        return (1, int(ext.rank is None), ext.rank or 0, ext.name, ext.id)
    return (2, 0, 0, ext.name, ext.id)


def decide(ext: Extension, kernel_release: str, abi_token: str | None, host: Host | None = None) -> Decision:
    container = ext.container
    labels = container.labels if container is not None else {}
    position, priority, warning = placement(labels) if ext.image is None else (SYSEXT, None, None)
    if ext.fault is not None or container is None:
        reason = ext.fault or "unreadable"
    elif container.state is not None:
        reason = f"container is {container.state}"
    else:
        reason = kernel_verdict(labels, ext.modules, kernel_release, abi_token)
        if reason is None and host is not None:
            from mobynit.core import compat  # a host is only made when there are extensions

            reason = compat.sysext_verdict(ext.release_name or ext.name, ext.release, host.os_release, host.architecture)
            mismatch = compat.os_version_verdict(labels, host.os_release.get("VERSION_ID"))
            if reason is None and mismatch is not None:
                if host.strict_os_version:
                    reason = f"{mismatch} ({CMDLINE_STRICT_OS_VERSION})"
                else:
                    kept = f"{mismatch}; kept (add {CMDLINE_STRICT_OS_VERSION} to skip it)"
                    warning = f"{warning}; {kept}" if warning else kept
    return Decision(
        extension=ext, included=reason is None, position=position, priority=priority, reason=reason, warning=warning
    )


def select(
    extensions: Iterable[Extension], kernel_release: str, abi_token: str | None, host: Host | None = None
) -> list[Decision]:
    """A decision for every extension found, in mount order."""
    return sorted((decide(ext, kernel_release, abi_token, host) for ext in extensions), key=order_key)
