"""Kernel modules the initramfs loads only when a boot needs them.

/init loads what every boot needs (lib/modules/load-order) before Python
starts. A sysext image on the data partition (mobynit.core.images) also
needs the loop driver and its file system, squashfs or erofs: the builder
(initramfs/build.py) ships those and lists them in lib/modules/on-demand,
one `<kind> <file>` line per module in load order, and they are loaded here
at the first image that needs them; a boot without images never pays.
"""

from __future__ import annotations

import posix

from mobynit.core import syscalls
from mobynit.core.fileio import is_dir
from mobynit.core.paths import basename, dirname, join

ON_DEMAND = "/lib/modules/on-demand"
LOOP = "loop"


class OnDemand:
    """`prepare(kind)` for mobynit.core.images.Mounts: loads the loop driver and
    the file system `kind`, with their dependencies, once. Raises OSError saying which."""

    def __init__(self, listing: str = ON_DEMAND) -> None:
        self.listing = listing
        self.loaded: set[str] = set()
        self.lines: list[tuple[str, str]] | None = None  # the listing, read at the first image

    def __call__(self, kind: str) -> None:
        for wanted, file in self._lines():
            if wanted in (LOOP, kind) and file not in self.loaded:
                self._load(join(dirname(self.listing), file))
                self.loaded.add(file)

    def _lines(self) -> list[tuple[str, str]]:
        if self.lines is None:
            self.lines = self._read()
        return self.lines

    def _read(self) -> list[tuple[str, str]]:
        try:
            with open(self.listing, encoding="utf-8") as f:
                words = [line.split() for line in f]
        except FileNotFoundError:
            return []  # built without them: the kernel has them built in, or says so at the mount
        return [(w[0], w[1]) for w in words if len(w) == 2 and "/" not in w[1]]

    @staticmethod
    def _load(path: str) -> None:
        name = basename(path).removesuffix(".ko")
        if is_dir(f"/sys/module/{name.replace('-', '_')}"):
            return  # loaded already (or built in)
        try:
            fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"module {name}: {e.strerror}") from None
        try:
            syscalls.finit_module(fd, name)
        except OSError as e:
            if e.errno != 17:  # EEXIST: loaded meanwhile
                raise OSError(e.errno, f"cannot load module {name}: {posix.strerror(e.errno) if e.errno else e}") from None
        finally:
            posix.close(fd)
