"""What the boot tests share: the kernel and initramfs, the devices and
their disks, and the scenarios (a disk and a command line) to boot.

Booting is the slow part, so the scenarios the selected tests need are
booted together, two machines at a time (one per core), the first time a
test asks for one; each test then asserts on its machine's console.
Logs are kept in build/boot-logs/<scenario>.log.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.harness.device import Device, build_device
from qemu import debian, debian_live, devices, disk, kernel, runner

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
LOGS = REPO / "build" / "boot-logs"
BASE_CMDLINE = "console=ttyS0 root=LABEL=resin-rootA"
BY_PARTUUID = "console=ttyS0 root=PARTUUID=6d6f6279-01"  # the device's own root, whatever else is plugged in
# A stick an attacker plugs in: its own disk signature and file system UUIDs.
ROGUE_SIGNATURE = 0x726F6775
ROGUE_ROOT_UUID = "726f6775-6500-4000-8000-726f6f744131"
ROGUE_DATA_UUID = "726f6775-6500-4000-8000-646174613031"
ROGUE_MARK = "/etc/rogue-was-here"


@dataclass(frozen=True)
class Scenario:
    disk: str  # a key of DISKS
    cmdline: str = ""  # appended to BASE_CMDLINE
    steps: tuple[runner.Step, ...] = ()
    late_disk: str | None = None  # a key of DISKS, plugged in once the guest waits
    timeout: float = 120.0
    base: str = BASE_CMDLINE
    extra: tuple[str, ...] = ()  # more disks (keys of DISKS), after `disk`


def plug_when_waiting(run: runner.Run) -> None:
    """Plug the late disk in once mobynit says it waits for it."""
    if run.expect(r"mobynit: waiting up to", 60):
        run.hotplug(0)


SCENARIOS: dict[str, Scenario] = {
    "hostapp-alone": Scenario("bare"),
    "extensions": Scenario("full"),
    "flat": Scenario("full-indexed"),
    "balena.nohostext": Scenario("full", "balena.nohostext"),
    "balena.disable_overlays": Scenario("full", "balena.disable_overlays"),
    "mobynit.no_overlays": Scenario("full", "mobynit.no_overlays"),
    "emergency": Scenario("full", "emergency"),
    # quiet: the kernel no longer echoes mobynit's kmsg lines; mobynit writes them itself.
    "switches-off": Scenario(
        "full", "balena.nohostext=0 balena.disable_overlays=0 mobynit.no_overlays=0 emergency=no quiet"),
    "names": Scenario(
        "full",
        f"mobynit.data=UUID={disk.DATA_UUID} init=/sbin/init-alt mobynit.debug",
        base="console=ttyS0 root=PARTUUID=6d6f6279-01",
    ),
    "no-data": Scenario("full-nodata", "mobynit.wait=2"),
    "no-marker": Scenario("full-nomarker", "mobynit.data=/dev/vda2", base="console=ttyS0 root=/dev/vda1"),
    "corrupt": Scenario("corrupt"),
    "broken": Scenario("broken"),
    "no-init": Scenario("full", "init=/sbin/nothing panic=1"),
    "no-root": Scenario("full", "mobynit.wait=1 panic=1", base="console=ttyS0 root=LABEL=nowhere"),
    "broken-shell": Scenario(
        "broken",
        "mobynit.shell",
        steps=(
            (r"mobynit: starting a rescue shell", "echo RESCUE-$((6*7)); [ -L /sysroot/current ] && echo ROOT-MOUNTED\n"),
            (r"^ROOT-MOUNTED", "poweroff -f\n"),
        ),
    ),
    "late-data": Scenario("full-nodata", f"mobynit.data=UUID={disk.DATA_UUID}", late_disk="full-dataonly"),
    # Issue 13: a second disk carrying the device's partition names, in both orders.
    "rogue-data-first": Scenario("rogue-data", extra=("full",)),
    "rogue-data-second": Scenario("full", extra=("rogue-data",)),
    "rogue-root-first": Scenario("rogue-root", extra=("full",), base=BY_PARTUUID),
    "rogue-root-second": Scenario("full", extra=("rogue-root",), base=BY_PARTUUID),
    "ambiguous-root": Scenario("full", "panic=1", extra=("rogue-root",)),
    "data-label-elsewhere": Scenario("full-nodata", "mobynit.wait=600", extra=("full-dataonly",)),
    "data-partuuid-elsewhere": Scenario("full-nodata", "mobynit.data=PARTUUID=64617461-01", extra=("full-dataonly",)),
    "data-path-elsewhere": Scenario("full-nodata", "mobynit.data=/dev/vdb1", extra=("full-dataonly",)),
    "damaged-data": Scenario("damaged-data", "mobynit.wait=600"),
    "data-errors": Scenario("data-errors"),
    "root-errors": Scenario("root-errors"),  # no panic=: /init's own setting must reboot it
    "bad-numbers": Scenario("full", "mobynit.wait=soon mobynit.max_tries=many"),
    # Strict os-version: debian-stale (made for Debian 11) stays out of the root, so the
    # cleanup unit may remove it (the manager never removes what the running root is made with).
    "debian": Scenario("debian", "mobynit.strict_os_version", timeout=300.0),
    # The same device flat (indexed), with sysext images on its data partition: live layering.
    "debian-live": Scenario("debian-live", timeout=300.0),
}


# --- devices and disks ---------------------------------------------------------------


def _copy_tree(src: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    import subprocess

    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    return dest


def _layer_dir(store: Path, container_id: str) -> Path:
    """The overlay2 directory of a container's (top) image layer."""
    chain = (store / "image/overlay2/layerdb/mounts" / container_id / "parent").read_text().split(":")[1]
    cache_id = (store / "image/overlay2/layerdb/sha256" / chain / "cache-id").read_text().strip()
    return store / "overlay2" / cache_id


class Disks:
    """Disk images by name, each built (with real engines) on first use."""

    def __init__(self, work: Path, kernel_release: str, modules: Path | None = None) -> None:
        self.work = work
        self.kernel_release = kernel_release
        self.modules = modules  # the kernel's lib/modules/<release>
        self.devices: dict[str, Device] = {}
        self.disks: dict[str, disk.Disk] = {}
        self.seconds: dict[str, float] = {}

    def device(self, name: str) -> Device:
        if name not in self.devices:
            start = time.monotonic()
            where = self.work / name
            if name == "bare":
                dev = build_device(where, devices.probe_hostapp())
            elif name == "full":
                dev = build_device(where, devices.probe_hostapp(), devices.test_extensions(self.kernel_release))
            elif name == "debian":
                dev = debian.build(where, CACHE, self.modules)
            elif name == "bad-init":  # tests/boot/test_boot_fallback.py
                dev = build_device(where, devices.probe_hostapp(), devices.bad_init_extensions())
            elif name == "rogue":  # an attacker's stick: its own hostapp, an override for the device's
                rogue = devices.extension("rogue", {"etc/hostapp-file": "patched by rogue\n",
                                                    ROGUE_MARK.lstrip("/"): "rogue\n"}, override=1)
                dev = build_device(where, devices.probe_hostapp("rogue-hostapp", {ROGUE_MARK.lstrip("/"): "rogue\n"}),
                                   (rogue,))
            else:
                raise KeyError(name)
            self.devices[name] = dev
            self.seconds[f"device {name}"] = time.monotonic() - start
        return self.devices[name]

    def get(self, name: str) -> disk.Disk:
        if name not in self.disks:
            start = time.monotonic()
            self.disks[name] = self._make(name, self.work / f"{name}.img")
            self.seconds[f"disk {name}"] = time.monotonic() - start
        return self.disks[name]

    def _make(self, name: str, path: Path) -> disk.Disk:
        if name in ("bare", "full", "debian", "bad-init"):
            dev = self.device(name)
            return disk.device_disk(path, dev.sysroot, dev.data)
        full = self.device("full")
        if name in ("rogue-data", "rogue-root"):
            rogue = self.device("rogue")
            parts = [disk.Partition(disk.DATA_LABEL, rogue.data, uuid=ROGUE_DATA_UUID)]
            if name == "rogue-root":
                parts.insert(0, disk.Partition(disk.ROOT_LABEL, rogue.sysroot, uuid=ROGUE_ROOT_UUID))
            return disk.make_disk(path, parts, signature=ROGUE_SIGNATURE)
        if name in ("damaged-data", "data-errors", "root-errors"):
            root = disk.Partition(disk.ROOT_LABEL, full.sysroot, uuid=disk.ROOT_UUID)
            data = disk.Partition(disk.DATA_LABEL, full.data, uuid=disk.DATA_UUID)
            if name == "damaged-data":
                data = replace(data, zero_superblock=True)
            elif name == "data-errors":  # errors=panic in the superblock, and a lookup that hits the damage
                data = replace(data, errors="panic", broken_dirs=("/docker/containers",))
            else:
                root = replace(root, errors="panic", broken_dirs=("/balena/containers",))
            return disk.make_disk(path, [root, data])
        if name == "debian-live":
            dev = self.device("debian")
            data = _copy_tree(dev.data, self.work / "data-debian-live")
            debian_live.live_inputs(data)
            sysroot = _copy_tree(dev.sysroot, self.work / "sysroot-debian-live")
            return disk.device_disk(path, sysroot, data, index=True)
        if name == "full-nodata":
            return disk.device_disk(path, full.sysroot, None)
        if name == "full-dataonly":
            return disk.data_disk(path, full.data)
        if name == "full-nomarker":
            data = _copy_tree(full.data, self.work / "data-nomarker")
            (data / "remove_me_to_reset").unlink()
            return disk.device_disk(path, full.sysroot, data)
        if name == "corrupt":
            data = _copy_tree(full.data, self.work / "data-corrupt")
            store = data / "docker"
            # A write cut short: still says it is an extension, no longer JSON.
            config = store / "containers" / full.extensions["tools"] / "config.v2.json"
            raw = config.read_text()
            cut = raw.rindex("io.balena.image.class") + 40
            assert cut < len(raw) - 1, "the label is too near the end of config.v2.json to cut after it"
            config.write_text(raw[:cut])
            shutil.rmtree(_layer_dir(store, full.extensions["firmware"]) / "diff")
            return disk.device_disk(path, full.sysroot, data)
        if name == "full-indexed":
            # The same device with its layers' facts recorded, as an image build
            # leaves them (mobynit index): boot can then mount one flat root.
            sysroot = _copy_tree(full.sysroot, self.work / "sysroot-indexed")
            data = _copy_tree(full.data, self.work / "data-indexed")
            return disk.device_disk(path, sysroot, data, index=True)
        if name == "broken":
            sysroot = _copy_tree(full.sysroot, self.work / "sysroot-broken")
            (sysroot / "current").unlink()
            (sysroot / "current").symlink_to("hostapps/" + "0" * 64)
            return disk.device_disk(path, sysroot, full.data)
        raise KeyError(f"no disk named {name}")


# --- booting -------------------------------------------------------------------------


@dataclass
class Kit:
    kernel: kernel.Kernel
    initrd: Path
    initrd_summary: dict
    disks: Disks
    results: dict[str, runner.Result] = field(default_factory=dict)

    def machine(self, scenario: Scenario) -> runner.Machine:
        cmdline = " ".join(p for p in (scenario.base, scenario.cmdline) if p)
        late = (self.disks.get(scenario.late_disk).path,) if scenario.late_disk else ()
        return runner.Machine(
            kernel=self.kernel.vmlinuz, initrd=self.initrd, cmdline=cmdline,
            disks=tuple(self.disks.get(d).path for d in (scenario.disk, *scenario.extra)), hotplug=late,
            timeout=scenario.timeout,
        )

    def boot(self, names: list[str]) -> None:
        """Boot the scenarios not booted yet, two at a time."""
        todo = [n for n in dict.fromkeys(names) if n not in self.results]
        jobs = []
        for name in todo:
            sc = SCENARIOS[name]
            kwargs: dict = {"steps": sc.steps}
            if sc.late_disk:
                kwargs["driver"] = plug_when_waiting
            jobs.append((name, self.machine(sc), kwargs))
        # The slowest first, so the pool does not end on it alone.
        jobs.sort(key=lambda job: -job[1].timeout)
        start = time.monotonic()
        self.results.update(runner.boot_all(jobs, LOGS))
        if jobs:
            sys.stderr.write(f"\n[boot] {len(jobs)} machines booted in {time.monotonic() - start:.1f} s\n")
        self.write_summary()

    def write_summary(self) -> None:
        """Guest timings of every boot so far, for people (build/boot-logs/summary.json)."""
        summary: dict[str, object] = {"initramfs_gzip_bytes": self.initrd_summary.get("gzip_bytes"),
                                      "build_seconds": self.disks.seconds, "boots": {}}
        for name, res in sorted(self.results.items()):
            rec = boot_record(res)
            boot = (rec or {}).get("boot") or {}
            entry: dict[str, object] = {"wall_seconds": round(res.seconds, 2), "returncode": res.returncode}
            if boot.get("init_start") is not None and boot.get("handover") is not None:
                entry["init_to_handover"] = round(boot["handover"] - boot["init_start"], 3)
                entry["extensions"] = sum(1 for e in rec.get("extensions", []) if e.get("included"))
                entry["phases"] = boot.get("phases")
            summary["boots"][name] = entry  # type: ignore[index]
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def boot_record(result: runner.Result) -> dict | None:
    """The /run/mobynit/boot.json the booted system saw, from its MARK line."""
    text = result.console.mark("bootjson")
    if not text or text == "none":
        return None
    return json.loads(text)


def files(result: runner.Result) -> dict[str, str]:
    """path -> first line, for each file the probe listed."""
    out = {}
    for value in result.console.marks("file"):
        path, _, first = value.partition(" ")
        out[path] = first
    return out


_KIT: Kit | None = None


def make_kit(work: Path, log: Callable[[str], None]) -> Kit:
    """The kit of this process: every boot test file shares one (the kernel,
    the initramfs and the devices are the same for all), made under the
    `work` of the first to ask."""
    global _KIT
    if _KIT is None:
        _KIT = _make_kit(work, log)
    return _KIT


def _make_kit(work: Path, log: Callable[[str], None]) -> Kit:
    start = time.monotonic()
    k = kernel.fetch(CACHE / "kernel")
    from initramfs import build as initramfs

    initrd = work / "initrd.gz"
    summary = initramfs.build(k.modules, initrd)
    log(f"[boot] kernel {k.release}, initramfs {summary['gzip_bytes'] / 1e6:.1f} MB gzipped "
        f"({time.monotonic() - start:.1f} s)")
    return Kit(kernel=k, initrd=initrd, initrd_summary=summary, disks=Disks(work, k.release, k.modules))
