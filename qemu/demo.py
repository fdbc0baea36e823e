"""The demo: build a device, show what boot will do, boot it, show what it did.

    python -m qemu.demo [--workdir DIR] [KERNEL PARAMETER ...]

1. builds a balenaOS-layout device with the real engine: a busybox hostapp
   and three extensions (tools and firmware add files, hotfix is an
   override that replaces a hostapp file), plus a systemd-sysext image on
   the data partition (diag.raw, squashfs), on one disk image;
2. prints `mobynit plan` for that device;
3. boots it in QEMU (Debian's kernel, mobynit's initramfs), streaming the
   console: mobynit's lines, then the booted system's own view;
4. prints the boot record the booted system had, as `mobynit status` shows it.

Extra arguments go on the kernel command line (try `balena.nohostext`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qemu import devices, kernel, runner

REPO = Path(__file__).resolve().parent.parent


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    work = REPO / "build" / "demo"
    if args[:1] == ["--workdir"] and len(args) > 1:
        work, args = Path(args[1]).absolute(), args[2:]
    if any(a.startswith("-") for a in args):
        print(__doc__)
        return 2
    if os.geteuid() != 0:
        print("demo: run as root (it starts dockerd and writes device nodes)", file=sys.stderr)
        return 1

    step("kernel and initramfs")
    k = kernel.fetch(REPO / ".cache" / "kernel")
    from initramfs import build as initramfs

    initrd = work / "initrd.gz"
    summary = initramfs.build(k.modules, initrd)
    print(f"kernel {k.release} (Debian linux-image-cloud-amd64, unpacked in .cache/)")
    print(f"initramfs {initrd}: {summary['gzip_bytes'] / 1e6:.1f} MB gzipped "
          f"(busybox, python3.11 with {len(summary['python_modules'])} modules, {len(summary['kernel_modules'])} kernel modules)")

    step("device: hostapp + 3 extensions (tools, firmware: normal; hotfix: override 10), built by dockerd,"
         " and a sysext image (diag.raw)")
    start = time.monotonic()
    shutil.rmtree(work / "device", ignore_errors=True)
    device = devices.build_device(work / "device", devices.demo_hostapp(), devices.three_extensions())
    devices.demo_image(device.data)
    disk = devices.device_disk(work / "device" / "disk.img", device.sysroot, device.data, index=True)
    print(f"{disk.path}: resin-rootA (/balena, /current -> hostapps/{device.hostapp_id[:12]}...), "
          f"resin-data (/docker, /extensions/diag.raw, /remove_me_to_reset); {time.monotonic() - start:.1f} s")

    cmdline = " ".join(["console=ttyS0", "root=LABEL=resin-rootA", "quiet", *args])
    step(f"mobynit plan  (kernel command line: {cmdline})")
    subprocess.run([sys.executable, "-m", "mobynit", "plan", "--sysroot", str(device.sysroot),
                    "--data", str(device.data), "--cmdline", cmdline, "--kernel-release", k.release], cwd=REPO)

    step("boot in QEMU (TCG): the serial console")
    machine = runner.Machine(k.vmlinuz, initrd, cmdline, (disk.path,), timeout=180)

    def show(_t: float, line: str) -> None:
        if not line.startswith("DEMO-RECORD "):
            print(f"  | {line}", flush=True)

    with runner.Run(machine, work / "console.log", "demo", on_line=show) as run:
        res = run.result(run.wait())
    if res.timed_out:
        print(f"demo: the machine did not finish within {machine.timeout:.0f} s (log: {res.log})", file=sys.stderr)
        return 1
    record_line = next((line for _, line in res.console.lines if line.startswith("DEMO-RECORD ")), None)
    if record_line is None:
        print(f"demo: the booted system left no boot record (log: {res.log})", file=sys.stderr)
        return 1
    record = json.loads(record_line.split(" ", 1)[1])
    (work / "boot.json").write_text(json.dumps(record, indent=2) + "\n")

    step("mobynit status  (the booted system's /run/mobynit/boot.json, copied out of the console)")
    subprocess.run([sys.executable, "-m", "mobynit", "status", "--record", str(work / "boot.json")], cwd=REPO)
    boot = record.get("boot", {})
    if boot.get("init_start") is not None:
        print(f"\ninit to handover: {boot['handover'] - boot['init_start']:.2f} s guest time; "
              f"QEMU ran {res.seconds:.1f} s; console log {res.log}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
