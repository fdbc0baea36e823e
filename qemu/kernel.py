"""Debian's cloud kernel, fetched as a package and unpacked, never installed.

`apt-get download` of the package the `linux-image-cloud-amd64`
metapackage depends on, then `dpkg-deb -x`: the bzImage and its modules in
a cache directory, reused across runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

METAPACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class Kernel:
    release: str
    vmlinuz: Path
    modules: Path  # lib/modules/<release>


class KernelError(RuntimeError):
    pass


def _run(*cmd: str, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise KernelError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def image_package(metapackage: str = METAPACKAGE) -> str:
    """The versioned linux-image package the metapackage currently points at."""
    try:
        out = _run("apt-cache", "show", "--no-all-versions", metapackage)
    except KernelError:
        _run("apt-get", "update", "-qq")
        out = _run("apt-cache", "show", "--no-all-versions", metapackage)
    m = re.search(r"^Depends:.*?(linux-image-[^\s,(]+)", out, re.M)
    if not m:
        raise KernelError(f"apt-cache show {metapackage}: no linux-image dependency")
    return m.group(1)


def fetch(cache: Path, package: str | None = None) -> Kernel:
    """The kernel in `cache`, downloading and unpacking it the first time."""
    package = package or image_package()
    root = cache / package
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user writes here
            _run("apt-get", "download", "-qq", package, cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise KernelError(f"apt-get download {package} left {len(debs)} packages")
            unpacked = Path(tmp) / "root"
            _run("dpkg-deb", "-x", str(debs[0]), str(unpacked))
            os.rename(unpacked, root)
        (root / ".complete").write_text(package + "\n")
    releases = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(releases) != 1:
        raise KernelError(f"{root}: expected one lib/modules/<release>, found {releases}")
    release = releases[0]
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise KernelError(f"{package} has no {vmlinuz.name}")
    return Kernel(release=release, vmlinuz=vmlinuz, modules=root / "lib/modules" / release)
