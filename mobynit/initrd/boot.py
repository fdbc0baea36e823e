"""The boot sequence, run by the initramfs's /init (busybox sh, PID 1).

/init mounts the kernel's file systems and loads modules, then runs this;
it prepares the new root completely and tells /init what to do next through
its exit status, because only PID 1 may `switch_root` out of the initramfs
(pivot_root from rootfs fails with EINVAL):

  0    the new root is ready at NEWROOT; /init execs `switch_root NEWROOT <init>`
       with the init named in HANDOVER
  100  the hostapp cannot be booted and `mobynit.shell` asks for a rescue shell
  else the hostapp cannot be booted: /init lets the kernel panic, which
       reboots (`panic=`), so the bootloader's boot counter can fall back

Sequence: find the root partition, mount it read-only, find and mount the
data partition (unless extensions are switched off), assemble the hostapp
with its extensions (containers, and sysext images from the data partition's
extensions/, see mobynit.core.images) read-only at NEWROOT, move /dev /proc /sys /run into it
and the root partition to /mnt/sysroot/active, leave the boot record at
/run/mobynit/boot.json.

Command line (besides the switches the assembler reads):
  root=DEV            root partition (LABEL=, UUID=, PARTUUID=, PARTLABEL=, /dev/...)
  rootfstype=TYPE     its file system, ext4 when absent
  mobynit.data=DEV    data partition, LABEL=resin-data when absent (by label: only from the
                      root partition's disk, see partitions.py); `none` for no data partition
  mobynit.wait=SECS   how long to wait for each of them to appear (30)
  init=PATH           the new root's init, /sbin/init when absent
  mobynit.shell       a rescue shell instead of a panic when the hostapp cannot boot
  mobynit.debug       more lines on the console
"""

from __future__ import annotations

import posix
import sys
import time

_IMPORTED = time.clock_gettime(time.CLOCK_BOOTTIME)  # before the package's own imports

from mobynit.core import assemble as assembler
from mobynit.core import attempts, cmdline, syscalls
from mobynit.core.errors import HostappError, MobynitError, StoreError, shown
from mobynit.core.fileio import is_dir, is_file, is_link, lexists, make_dirs
from mobynit.core.paths import ACTIVE_SYSROOT, dirname, store_paths
from mobynit.core.record import DEFAULT_RECORD, BootInfo, BootRecord, Partition
from mobynit.initrd import blockdev, partitions
from mobynit.initrd.console import Console
from mobynit.initrd.modules import OnDemand

EXIT_HANDOVER = 0
EXIT_RESCUE = 100
EXIT_PANIC = 1

NEWROOT = "/newroot"
SYSROOT = "/sysroot"
DATA = "/data"
WORKDIR = "/tmp/mobynit/work"  # in the initramfs: gone with it
HANDOVER = "/tmp/mobynit/handover"
RECORD = DEFAULT_RECORD  # where the booted system finds it
ACTIVE = ACTIVE_SYSROOT
MOVED = ("/dev", "/proc", "/sys", "/run")

DEFAULT_DATA = "LABEL=resin-data"
DEFAULT_INIT = "/sbin/init"
DEFAULT_WAIT = 30.0


def uptime() -> float:
    """Seconds since the kernel started, the clock of /proc/uptime and dmesg."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Boot:
    """One boot: the decisions made so far, their timings, and the voice."""

    def __init__(self, cmd: cmdline.Cmdline, console: Console, init_start: float | None) -> None:
        self.cmd = cmd
        self.console = console
        self.log = console.info
        self.phases: dict[str, float] = {}
        self.init_start = init_start
        self.modules_loaded = _float(posix.environ.get(b"MOBYNIT_MODULES_LOADED"))
        self.python_start = round(_IMPORTED, 3)
        self.python_ready = round(uptime(), 3)
        self.root: Partition | None = None
        self.data: Partition | None = None
        self._wait: float | None = None
        self.root_part: blockdev.Part | None = None
        self.data_reason: str | None = None  # why there is no data partition, for the assembler to say

    def timed(self, phase: str, start: float) -> None:
        self.phases[phase] = round(time.monotonic() - start, 4)

    def wait(self) -> float:
        """`mobynit.wait`, read (and warned about) once for both partitions."""
        if self._wait is not None:
            return self._wait
        value = self.cmd.get("mobynit.wait")
        seconds = DEFAULT_WAIT
        if value is not None:
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds < 3600:
                self.log(f"mobynit.wait={value} is not a number of seconds from 0 to 3600; "
                         f"using the default, {DEFAULT_WAIT:g} s")
                seconds = DEFAULT_WAIT
        self._wait = seconds
        return seconds

    def mount_root(self) -> None:
        text = self.cmd.get("root")
        if not text:
            raise HostappError("no root= on the kernel command line: cannot find the root partition")
        try:
            spec = blockdev.DeviceSpec(text)
        except ValueError as e:
            raise HostappError(f"root partition: {e}") from None
        start = time.monotonic()
        hint = partitions.loader_partuuid()
        if hint is not None:
            self.console.debug(f"the boot loader came from PARTUUID={hint} (LoaderDevicePartUUID)")
        choice, waited = partitions.settle(
            lambda snap, final: partitions.choose_root(snap, spec, hint, final),
            self.wait(), f"root partition {spec}", self.log)
        self.timed("wait_root", start)
        if choice.part is None:
            raise HostappError(choice.why or f"root partition {spec} not found")
        root = choice.part
        path = spec.value if spec.key == "PATH" else root.path
        if waited > 0:
            self.log(f"{spec} appeared as {path} after {waited:.2f} s")
        if choice.ignored:
            ident = blockdev.ext_identity(root.path)
            like = f" ({shown(ident[0])})" if ident is not None else ""
            self.log(f"ignoring {partitions.names(choice.ignored)}: named like the root partition{like}, "
                     f"but not on its disk {root.disk}")
        fstype = self.cmd.get("rootfstype") or "ext4"
        start = time.monotonic()
        make_dirs(SYSROOT)
        try:
            syscalls.mount(path, SYSROOT, fstype, syscalls.MS_RDONLY)
        except OSError as e:
            raise HostappError(f"cannot mount root partition {path} ({fstype}) read-only: {e.strerror}") from None
        self.timed("mount_root", start)
        self.root_part = root
        self.root = Partition(spec=text, device=path, fstype=fstype, ignored=tuple(p.path for p in choice.ignored))
        self.log(f"root {_named(text, path)}, mounted read-only")

    def mount_data(self) -> str | None:
        """The data partition's mount point, or None to boot without extensions
        (the reason, kept in data_reason, is the assembler's line to say)."""
        text = self.cmd.get("mobynit.data") or DEFAULT_DATA
        self.data = Partition(spec=text, device=None)
        switch = self.cmd.extensions_disabled_by()
        if switch is not None:
            self.data = self.data.replace(reason=f"extensions disabled by {switch}")
            # The assembler says why extensions are off; this is only the consequence.
            self.console.debug(f"data partition not mounted: extensions disabled by {switch}")
            return None
        path, why = self._find_data(text)
        if path is None:
            self.data = self.data.replace(reason=why)
            self.data_reason = why
            return None
        start = time.monotonic()
        make_dirs(DATA)
        try:
            # Read-write, as the booted system mounts it: an ext4 superblock
            # held read-only by the overlay would make that mount fail (EBUSY).
            # errors=remount-ro: whatever its superblock says (errors=panic), a
            # damaged data partition must not take the kernel down with it.
            syscalls.mount(path, DATA, "ext4", syscalls.MS_NOSUID | syscalls.MS_NODEV, "errors=remount-ro")
        except OSError as e:
            self.data_reason = f"cannot mount data partition {path}: {e.strerror}"
            self.data = self.data.replace(reason=self.data_reason)
            return None
        self.timed("mount_data", start)
        self.data = self.data.replace(device=path)
        return DATA

    def _find_data(self, text: str) -> tuple[str | None, str]:
        """(the data partition's device, or None and why not); names on the
        console any partition that carries its name but is not trusted."""
        if text == "none":
            return None, "no data partition (mobynit.data=none)"
        try:
            spec = blockdev.DeviceSpec(text)
        except ValueError as e:
            return None, f"data partition: {e}"
        root = self.root_part
        assert root is not None, "the root partition is found first"
        start = time.monotonic()
        choice, waited = partitions.settle(
            lambda snap, final: partitions.choose_data(snap, spec, root, final),
            self.wait(), f"data partition {spec}", self.log)
        self.timed("wait_data", start)
        if choice.ignored:
            self.log(f"ignoring {partitions.names(choice.ignored)}: it carries {spec}, but only the root "
                     f"partition's disk {root.disk} is trusted for it")
            self.data = self.data.replace(ignored=tuple(p.path for p in choice.ignored))
        if choice.part is None:
            return None, choice.why or f"data partition {spec} not found"
        path = spec.value if spec.key == "PATH" else choice.part.path
        if waited > 0:
            self.log(f"{spec} appeared as {path} after {waited:.2f} s")
        where = "" if choice.part.disk == root.disk else f", on disk {choice.part.disk} as named (the root partition is on {root.disk})"
        self.log(f"data {_named(text, path)}{where}")
        return path, ""

    def assemble(self, data: str | None) -> BootRecord:
        start = time.monotonic()
        make_dirs(NEWROOT)
        make_dirs(WORKDIR)
        record = assembler.assemble(
            store_paths(SYSROOT, data),
            target=NEWROOT,
            cmdline=self.cmd,
            kernel_release=posix.uname().release,
            page_size=posix.sysconf("SC_PAGE_SIZE"),
            workdir=WORKDIR,
            log=self.log,
            # Boots with extensions are counted on the data partition; unconfirmed
            # ones make later boots mount the hostapp alone (docs/fallback.md).
            attempts_file=None if data is None else attempts.state_path(data),
            data_reason=self.data_reason,
            prepare_images=OnDemand(),  # loop and squashfs/erofs, at the first sysext image only
        )
        self.timed("assemble", start)
        if data is not None:
            # The overlay holds its own references to the layers it uses.
            syscalls.umount(data, syscalls.MNT_DETACH)
        return record

    def account(self, init: str) -> BootInfo:
        """The initramfs's part of the boot record, at the handover."""
        return BootInfo(
            init_start=self.init_start, modules_loaded=self.modules_loaded, python_start=self.python_start,
            python_ready=self.python_ready, cmdline=self.cmd.text.strip(), root=self.root, data=self.data,
            init=init, phases=self.phases, handover=round(uptime(), 3),
        )

    def init_path(self) -> str:
        init = self.cmd.get("init") or DEFAULT_INIT
        if not init.startswith("/") or "\n" in init:
            raise HostappError(f"init={init} is not an absolute path")
        found = resolve_in(NEWROOT, init)
        if found is None:
            raise HostappError(f"the hostapp has no {init} to hand over to")
        if not is_file(found) or not posix.access(found, posix.X_OK):
            raise HostappError(f"the hostapp's {init} is not an executable file")
        return init

    def move_mounts(self) -> None:
        """Everything the new root needs from the initramfs moves into it."""
        start = time.monotonic()
        active = NEWROOT + ACTIVE
        try:
            if is_dir(active):
                syscalls.mount(SYSROOT, active, None, syscalls.MS_MOVE)
            else:
                self.log(f"the hostapp has no {ACTIVE}: root partition not exposed")
                syscalls.umount(SYSROOT, syscalls.MNT_DETACH)
            for path in MOVED:
                if is_dir(NEWROOT + path):
                    syscalls.mount(path, NEWROOT + path, None, syscalls.MS_MOVE)
                else:
                    self.log(f"the hostapp has no {path}: its init must mount it")
        except OSError as e:
            raise HostappError(f"cannot move the initramfs's mounts into the new root: {e.strerror}") from None
        self.timed("move_mounts", start)


def resolve_in(root: str, path: str, hops: int = 40) -> str | None:
    """`path` inside `root` with symlinks followed as if `root` were `/`;
    None when it does not exist (or loops)."""
    parts = [p for p in path.split("/") if p]
    done = ""
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            done = done.rpartition("/")[0]
            continue
        here = f"{done}/{part}"
        full = root + here
        if is_link(full):
            hops -= 1
            if hops < 0:
                return None
            target = posix.readlink(full)
            if target.startswith("/"):
                done = ""
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not lexists(full):
            return None
        done = here
    return root + (done or "/")


def run(console: Console, cmd: cmdline.Cmdline) -> int:
    boot = Boot(cmd, console, _float(posix.environ.get(b"MOBYNIT_INIT_START")))
    log = boot.log
    from mobynit import __version__

    log(f"mobynit {__version__} on {posix.uname().release}")
    debug = console.debug
    debug(f"command line: {cmd.text.strip()}")
    debug(f"initramfs: init started at {boot.init_start} s, modules loaded at "
          f"{boot.modules_loaded} s, python at {boot.python_start} s")
    try:
        boot.mount_root()
        data = boot.mount_data()
        record = boot.assemble(data)
        init = boot.init_path()
        make_dirs(dirname(RECORD))
        boot.move_mounts()
    except MobynitError as e:
        log(f"cannot boot: {e}")
        if cmd.flag("mobynit.shell"):
            log("starting a rescue shell (mobynit.shell); leaving it reboots")
            return EXIT_RESCUE
        log("no rescue shell (add mobynit.shell); panicking so the bootloader can fall back")
        return EXIT_PANIC
    debug("phases: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in boot.phases.items()))
    info = boot.account(init)
    start = info.init_start or info.python_start
    log(f"handing over to {init}, {info.handover - start:.2f} s after init started")
    try:
        record.replace(boot=info).write(NEWROOT + RECORD)
    except StoreError as e:
        log(f"boot record not written: {e}")
    make_dirs(dirname(HANDOVER))
    with open(HANDOVER, "w", encoding="utf-8") as f:
        f.write(init + "\n")
    return EXIT_HANDOVER


def _named(spec: str, path: str) -> str:
    """`LABEL=x is /dev/vda1`, or just `/dev/vda1` when that is how it was named."""
    return path if spec == path else f"{spec} is {path}"


def _float(text: bytes | None) -> float | None:
    """A number /init exported (posix.environ holds bytes), None when absent or not a number."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


def main() -> None:
    """Entry point for /init. Never lets a traceback be the last word.

    Ends the process itself: streams flushed, no interpreter teardown
    (mobynit.core.process); /init's line has turned the collector off."""
    from mobynit.core import process

    process.short_lived()  # if the launch line did not
    cmd = cmdline.parse("")
    console = None
    try:
        cmd = cmdline.read()
        console = Console(verbose=cmd.flag("mobynit.debug"))
        code = run(console, cmd)
    except Exception as e:  # a bug: say so plainly, then let /init decide
        import traceback

        traceback.print_exc()
        line = f"internal error: {type(e).__name__}: {e}"
        if console is not None:
            console.info(line)
        else:
            print(f"mobynit: {line}", file=sys.stderr, flush=True)
        code = EXIT_RESCUE if cmd.flag("mobynit.shell") else EXIT_PANIC
    if console is not None:
        console.close()
    process.finish(code)


if __name__ == "__main__":
    main()
