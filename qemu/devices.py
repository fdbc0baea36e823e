"""The devices the boot tests and the demo boot: a busybox hostapp whose
/sbin/init reports what it sees, extensions, and their disks.

The probe init prints `MARK <name> <value>` lines on the serial console
(parsed by qemu.runner.Console) and powers off:

  init-start    /proc/uptime when it started        pid        its pid (1)
  root          fstype and options of /              write-root what a write to / gives
  active        what /mnt/sysroot/active holds       dockerenv  yes/no
  file          "<path> <first line>" for each file under /etc and /usr/share
  bootjson      /run/mobynit/boot.json on one line   kmsg       mobynit lines in dmesg
  devkmsg       kernel.printk_devkmsg as handed over
  mount         one per /proc/mounts line            cmdline    /proc/cmdline
"""

from __future__ import annotations

from pathlib import Path

from tests.harness.device import OVERLAY_CLASS, Device, ExtensionSpec, HostappSpec, Layer, build_device
from tests.harness.rootfs import File

from qemu.disk import Disk, device_disk

PROBE_INIT = r"""#!/bin/busybox sh
# The test hostapp's init: report what the booted system sees, then power off.
bb=/bin/busybox
mark() { echo "MARK $*"; }
mark init-start "$($bb cut -d' ' -f1 /proc/uptime)"
mark pid $$
mark cmdline "$($bb cat /proc/cmdline)"
root=""
while read -r dev mnt fs opts rest; do
    [ "$mnt" = / ] && root="$fs $opts"
    mark mount "$dev $mnt $fs $opts"
done < /proc/mounts
mark root "$root"
if err=$($bb touch /written-by-init 2>&1); then mark write-root ok; else mark write-root "$err"; fi
if [ -e /.dockerenv ]; then mark dockerenv yes; else mark dockerenv no; fi
mark active "$($bb ls /mnt/sysroot/active | $bb tr '\n' ' ')"
for f in $($bb find /etc /usr/share -type f | $bb sort); do
    mark file "$f $($bb head -n 1 "$f")"
done
if [ -f /run/mobynit/boot.json ]; then
    mark bootjson "$($bb tr -d '\n' < /run/mobynit/boot.json)"
else
    mark bootjson none
fi
mark kmsg "$($bb dmesg | $bb grep -c 'mobynit: ')"
mark devkmsg "$($bb cat /proc/sys/kernel/printk_devkmsg)"
mark done
$bb poweroff -f
"""


DEMO_INIT = r"""#!/bin/busybox sh
# The demo hostapp's init: show the booted system's view, then power off.
bb=/bin/busybox
show() { echo "\$ $*"; $bb "$@" 2>&1; }
echo
echo "=== the booted system (PID $$, /sbin/init of the hostapp) ==="
echo '$ grep -E " / | /mnt/sysroot/active " /proc/mounts'
$bb grep -E " / | /mnt/sysroot/active " /proc/mounts
show cat /etc/hostapp-file
show cat /usr/share/tools/hello
show cat /usr/share/firmware/blob
show cat /usr/share/diag/hello
show touch /etc/new-file
show ls /.dockerenv
show ls /mnt/sysroot/active
echo '$ dmesg | grep -c "mobynit: "'
$bb dmesg | $bb grep -c "mobynit: "
show ls -l /run/mobynit/boot.json
echo "DEMO-RECORD $($bb tr -d '\n' < /run/mobynit/boot.json)"
echo "=== powering off ==="
$bb poweroff -f
"""


def demo_image(data: Path) -> Path:
    """A sysext image on the data partition (data/extensions/diag.raw, squashfs) that boot
    joins to the root (docs/boot.md): its file is in /usr before the demo's init runs."""
    import subprocess
    import tempfile

    out = data / "extensions" / "diag.raw"
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        for rel, text in {"usr/share/diag/hello": "hello from the diag sysext image\n",
                          "usr/lib/extension-release.d/extension-release.diag": "ID=balena-os\nVERSION_ID=7.0.0\n"}.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        subprocess.run(["mksquashfs", str(src), str(out), "-quiet", "-noappend", "-all-root"], check=True,
                       capture_output=True)
    return out


def demo_hostapp() -> HostappSpec:
    """The demo's hostapp: the probe hostapp's files with a talking init."""
    spec = probe_hostapp()
    first = dict(spec.layers[0].files)
    first["sbin/init"] = File(DEMO_INIT, 0o755)
    return HostappSpec(name="demo-hostapp", layers=(Layer(files=first), *spec.layers[1:]))


def probe_hostapp(name: str = "hostapp", files: dict | None = None) -> HostappSpec:
    """A busybox hostapp whose init is the probe above, in three layers: the
    second adds the files a test wants, the third deletes one of them."""
    first = {
        "sbin/init": File(PROBE_INIT, 0o755),
        "sbin/init-alt": File('#!/bin/busybox sh\necho "MARK alt-init $$"\nexec /sbin/init\n', 0o755),
        "etc/os-release": 'ID=balena-os\nNAME="balenaOS"\nVERSION_ID=7.0.0\n',
    }
    second = {
        "etc/hostapp-file": "hostapp\n",
        "usr/share/hostapp/only-in-hostapp": "only in hostapp\n",
        "etc/to-delete": "deleted by the next layer\n",
        **(files or {}),
    }
    # The third layer deletes a file: a whiteout the disk image must keep.
    return HostappSpec(name=name, layers=(Layer(files=first), Layer(files=second), Layer(delete=["etc/to-delete"])))


def extension(name: str, files: dict, override: int | str | None = None, labels: dict | None = None) -> ExtensionSpec:
    merged = {**OVERLAY_CLASS, **(labels or {})}
    if override is not None:
        merged["io.balena.image.override"] = str(override)
    return ExtensionSpec(name=name, layers=(Layer(files=files),), labels=merged)


def three_extensions() -> tuple[ExtensionSpec, ...]:
    """Two normal extensions and one override, as in the demo."""
    return (
        extension("tools", {"usr/share/tools/hello": "hello from tools\n", "etc/hostapp-file": "tools (must not win)\n"}),
        ExtensionSpec(
            name="firmware",
            layers=(
                Layer(files={"usr/share/firmware/blob": "firmware v1\n", "usr/share/firmware/old/stale": "v1\n"}),
                # An update in a second layer: a replaced file, and an opaque directory.
                Layer(files={"usr/share/firmware/blob": "firmware v2\n", "usr/share/firmware/old/fresh": "v2\n"},
                      opaque=["usr/share/firmware/old"]),
            ),
            labels=dict(OVERLAY_CLASS),
        ),
        extension("hotfix", {"etc/hostapp-file": "patched by hotfix\n", "usr/share/hotfix/note": "override 10\n"}, override=10),
    )


def test_extensions(kernel_release: str) -> tuple[ExtensionSpec, ...]:
    """The demo's three, a second override that outranks the first (5 < 10),
    and a pair labelled for a kernel version: the running one (kept) and an
    old one (dropped), as the booted kernel reports its release."""
    running = kernel_release.split("-", 1)[0]
    urgent = extension("urgent", {"etc/hostapp-file": "patched by urgent\n"}, override=5)
    kmod_ok = extension("kmod-ok", {"usr/share/kmod-ok/hello": f"built for {running}\n"},
                        labels={"io.balena.image.kernel-version": running})
    kmod_old = extension("kmod-old", {"usr/share/kmod-old/hello": "built for 5.15.0\n"},
                         labels={"io.balena.image.kernel-version": "5.15.0"})
    return (*three_extensions(), urgent, kmod_ok, kmod_old)


def build(workdir: Path, hostapp: HostappSpec, extensions=(), purge_marker: bool = True,
          data: bool = True, index: bool = False) -> tuple[Device, Disk]:
    """A device (real engines) and its disk image at workdir/disk.img; with
    `index`, its layers' facts recorded so that boot can mount it flat."""
    device = build_device(workdir, hostapp, extensions, purge_marker=purge_marker)
    disk = device_disk(workdir / "disk.img", device.sysroot, device.data if data else None, index=index)
    return device, disk


# --- fallback after failed boots (tests/boot/test_boot_fallback.py) ----------------------

BAD_INIT = """#!/bin/busybox sh
# An override's /sbin/init that cannot boot anything: it shows the boot record
# it was left (so a test sees each failed boot counted), then PID 1 exits and
# the kernel panics.
echo "MARK bad-init $$"
echo "MARK bootjson $(/bin/busybox tr -d '\n' < /run/mobynit/boot.json)"
exit 1
"""


def bad_init_extensions() -> tuple[ExtensionSpec, ...]:
    """An override that replaces the hostapp's init with one that exits at once
    (the boot it takes part in never comes up, so never confirms), beside a
    harmless normal extension: both must go when boot gives up on the set."""
    return (
        extension("bad-init", {"sbin/init": File(BAD_INIT, 0o755), "usr/share/bad-init/note": "override 1\n"},
                  override=1),
        extension("tools", {"usr/share/tools/hello": "hello from tools\n"}),
    )
