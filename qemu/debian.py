"""A realistic hostapp: Debian with systemd, made by debootstrap.

The tree is cached (it takes minutes to make and never changes for a given
suite and package list); the device around it is built with the real
engine like every other device: the tree is imported as the hostapp's base
layer, a build step adds a probe service, and the container is created.

The probe service runs once multi-user.target is reached and prints what
the booted system says about itself as `MARK` lines on the console:
`target` (is-active multi-user.target), `virt` (systemd-detect-virt
--container), `bootjson`, `dockerenv`, `root` and the extension's file,
then powers off.

The hostapp also confirms its boots to mobynit as a device would: it ships
docs/examples/mobynit-confirm.service (enabled), the `mobynit` command and
an fstab line that mounts the data partition at /mnt/data. The probe runs
after the confirmation and reports it: `confirm` (the unit's state and
result), `confirm-said` (its output) and `attempts` (the state file as
confirm left it).

The hostapp also runs the engine (Debian's docker.io, its data-root the data
partition's store) with the extension runtime registered by
docs/examples/extension-runtime.conf, and the manager's cleanup after the
confirmation (docs/examples/mobynit-extension-cleanup.service). The probe
reports `runtimes` (what the engine registered), `ext-run` (an extension run
with `--runtime extension` in the booted system: its exit code and hook
output), `cleanup` and `cleanup-said` (the cleanup unit and what it removed),
and `containers` (what is left in the store).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.debian_live import LIVE_MODULES, LIVE_PROBE, TREE
from tests.harness.device import OVERLAY_CLASS, Device, ExtensionSpec, Layer, build_scratch_images
from tests.harness.engine import Engine
from tests.harness.rootfs import File, Symlink

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = ("systemd", "systemd-sysv", "udev", "python3", "python3-attr", "docker.io")
PACKAGE = Path(__file__).resolve().parent.parent / "mobynit"  # installed into the hostapp, for `mobynit status`
CONFIRM_UNIT = PACKAGE.parent / "docs" / "examples" / "mobynit-confirm.service"
RUNTIME_DROPIN = PACKAGE.parent / "docs" / "examples" / "extension-runtime.conf"
CLEANUP_UNIT = PACKAGE.parent / "docs" / "examples" / "mobynit-extension-cleanup.service"
EXTRA_DIRS = ("mnt/sysroot/active", "mnt/data")

PROBE = r"""#!/bin/sh
# Reports, on the console, what the booted Debian says about itself.
mark() { echo "MARK $*" > /dev/console; }
mark target "$(systemctl is-active multi-user.target)"
mark virt "$(systemd-detect-virt --container)"
mark state "$(systemctl is-system-running)"
if [ -e /.dockerenv ]; then mark dockerenv yes; else mark dockerenv no; fi
mark root "$(findmnt -n -o FSTYPE,OPTIONS /)"
if [ -f /run/mobynit/boot.json ]; then mark bootjson "$(tr -d '\n' < /run/mobynit/boot.json)"; else mark bootjson none; fi
python3 -m mobynit status 2>&1 | while IFS= read -r line; do mark status "$line"; done
if [ -d /mnt/data/live-probe ]; then  # the debian-live disk: live layering instead of the rest
    /usr/local/sbin/mobynit-live-probe
    mark uptime "$(cut -d' ' -f1 /proc/uptime)"
    mark done
    systemctl --no-block poweroff
    exit 0
fi
confirm=mobynit-confirm.service state=/mnt/data/mobynit/boot-attempts.json
mark confirm "$(systemctl show -P ActiveState $confirm) $(systemctl show -P Result $confirm)"
journalctl -b -o cat -u $confirm | grep '^mobynit: ' | while IFS= read -r line; do mark confirm-said "$line"; done
if [ -f $state ]; then mark attempts "$(tr -d '\n' < $state)"; else mark attempts none; fi
mark runtimes "$(docker info --format '{{json .Runtimes.extension}}' 2>&1)"
image=$(docker inspect -f '{{.Image}}' debian-ext 2>&1)
# (no apparmor_parser in this hostapp: the engine cannot load its default profile)
out=$(docker run --name probe-ext --runtime extension --security-opt apparmor=unconfined "$image" /never-run 2>&1)
mark ext-run "$? $(docker inspect -f '{{.State.ExitCode}}' probe-ext 2>&1) $(echo $out | tr '\n' ' ')"
docker rm probe-ext > /dev/null 2>&1
cleanup=mobynit-extension-cleanup.service
mark cleanup "$(systemctl show -P ActiveState $cleanup) $(systemctl show -P Result $cleanup)"
journalctl -b -o cat -u $cleanup | grep -e '^mobynit-extension-manager: ' | while IFS= read -r line; do mark cleanup-said "$line"; done
mark containers "$(docker ps -a --format '{{.Names}}' | sort | tr '\n' ' ')"
for f in /usr/share/debian-ext/hello /etc/debian-probe; do
    [ -f "$f" ] && mark file "$f $(head -n 1 "$f")"
done
mark uptime "$(cut -d' ' -f1 /proc/uptime)"
mark done
systemctl --no-block poweroff
"""

# What `pip install` would write as the console script (pyproject's [project.scripts]).
COMMAND = """#!/usr/bin/python3
import sys
from mobynit.tools.cli import main
sys.exit(main())
"""
# The runtime's and the manager's, under our names and the Go tool's.
RUNTIME_COMMAND = """#!/usr/bin/python3
import sys
from mobynit.runtime.cli import main
sys.exit(main())
"""
MANAGER_COMMAND = """#!/usr/bin/python3
import sys
from mobynit.runtime.manager import main
sys.exit(main())
"""
# The engine's own options on the hostapp: its store is the data partition's (as balenaOS
# bind-mounts it on /var/lib/docker), no networking to set up in the test machine.
DOCKER_DEFAULTS = 'DOCKER_OPTS="--data-root /mnt/data/docker --storage-driver overlay2 --bridge=none --iptables=false"\n'
DOCKER_NEEDS_DATA = "[Unit]\nRequiresMountsFor=/mnt/data\n"
# The root is read-only: the engine's trust key goes to /run (the only thing in its config), and
# Debian's system containerd (its root in /var/lib) is masked: dockerd runs its own, in its data-root.
DOCKER_CONFIG = '{"deprecated-key-path": "/run/docker-key.json"}\n'

# The data partition where the booted system expects it (mnt-data.mount, which
# mobynit-confirm.service requires); fsck is left to the OS (pass 0).
FSTAB = "LABEL=resin-data /mnt/data ext4 nosuid,nodev 0 0\n"

UNIT = """[Unit]
Description=mobynit boot test probe
After=multi-user.target mobynit-confirm.service mobynit-extension-cleanup.service docker.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/mobynit-probe
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


def tree(cache: Path, suite: str = SUITE, mirror: str = MIRROR, log=print) -> Path:
    """The debootstrap tree for `suite`, made once and cached under `cache`."""
    root = cache / f"debootstrap-{suite}-{'-'.join(INCLUDE)}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".debootstrap."))
    start = time.monotonic()
    res = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", suite, str(work), mirror],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"debootstrap {suite} from {mirror} failed:\n{tail}")
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (work / sub).glob("*"):
            if p.is_file():
                p.unlink()
    log(f"debootstrap {suite}: {time.monotonic() - start:.0f} s")
    work.rename(root)
    (root / ".complete").write_text(f"{suite} {mirror} {' '.join(INCLUDE)}\n")
    return root


def build(workdir: Path, cache: Path, modules: Path | None = None) -> Device:
    """sysroot/ and data/ of a device whose hostapp is the Debian tree with
    the probe service, and whose data store holds one normal extension (and
    the image `debian-live`, which the live probe installs). `modules` is the
    kernel's lib/modules/<release>: the hostapp ships its loop and squashfs
    modules there, as a device's hostapp ships its kernel's."""
    base_tree = tree(cache)
    sysroot, data = workdir / "sysroot", workdir / "data"
    sysroot.mkdir(parents=True)
    data.mkdir(parents=True)
    # Staged beside the cache, so hard links keep the copy cheap; the import
    # must not carry the cache's stamp.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".stage.") as tmp:
        staged = Path(tmp) / "tree"
        subprocess.run(["cp", "-a", "--link", str(base_tree), str(staged)], check=True)
        (staged / ".complete").unlink()
        for d in EXTRA_DIRS:
            (staged / d).mkdir(parents=True, exist_ok=True)
        # The engine starts when something wants it (the cleanup unit, the probe, its socket), not as
        # part of multi-user.target: the target is not held up by it.
        for unit in ("docker.service", "containerd.service"):
            (staged / "etc/systemd/system/multi-user.target.wants" / unit).unlink(missing_ok=True)
        host = Engine(sysroot / "balena")
        ext = Engine(data / "docker")
        try:
            host.start(wait=False)
            ext.start(wait=False)
            host.wait_ready()
            ext.wait_ready()
            host.import_tree(staged, "debian-base:build")
            files = {
                "probe/usr/local/sbin/mobynit-probe": File(PROBE, 0o755),
                "probe/etc/systemd/system/mobynit-probe.service": UNIT,
                "probe/etc/systemd/system/multi-user.target.wants/mobynit-probe.service": Symlink("../mobynit-probe.service"),
                "probe/etc/debian-probe": "debian hostapp\n",
                "probe/etc/hostname": "mobynit-debian\n",
                "probe/etc/fstab": FSTAB,
                "probe/usr/bin/mobynit": File(COMMAND, 0o755),
                "probe/etc/systemd/system/mobynit-confirm.service": CONFIRM_UNIT.read_text(),
                "probe/etc/systemd/system/multi-user.target.wants/mobynit-confirm.service":
                    Symlink("../mobynit-confirm.service"),
                "probe/etc/systemd/system/docker.service.d/extension-runtime.conf": RUNTIME_DROPIN.read_text(),
                "probe/etc/systemd/system/docker.service.d/data.conf": DOCKER_NEEDS_DATA,
                "probe/etc/default/docker": DOCKER_DEFAULTS,
                "probe/etc/docker/daemon.json": DOCKER_CONFIG,
                "probe/etc/systemd/system/containerd.service": Symlink("/dev/null"),
                "probe/etc/systemd/system/mobynit-extension-cleanup.service": CLEANUP_UNIT.read_text(),
                "probe/etc/systemd/system/multi-user.target.wants/mobynit-extension-cleanup.service":
                    Symlink("../mobynit-extension-cleanup.service"),
                "probe/usr/bin/balena-extension-runtime": File(RUNTIME_COMMAND, 0o755),
                "probe/usr/bin/mobynit-runtime": File(RUNTIME_COMMAND, 0o755),
                "probe/usr/bin/balena-extension-manager": File(RUNTIME_COMMAND, 0o755),
                "probe/usr/bin/mobynit-extension-manager": File(MANAGER_COMMAND, 0o755),
            }
            files["probe/usr/local/sbin/mobynit-live-probe"] = File(LIVE_PROBE, 0o755)
            files["probe/usr/local/bin/mobynit-tree"] = File(TREE, 0o755)
            if modules is not None:
                for rel in LIVE_MODULES:
                    files[f"probe/usr/lib/modules/{modules.name}/{rel}"] = (modules / rel).read_bytes()
            for src in sorted(PACKAGE.rglob("*.py")):
                rel = src.relative_to(PACKAGE)
                files[f"probe/usr/local/lib/python3.11/dist-packages/mobynit/{rel}"] = src.read_bytes()
            image = host.build("debian:latest", "FROM debian-base:build\nCOPY probe/ /\n", files)
            hostapp_id = host.create(image, "debian")
            spec = ExtensionSpec(
                name="debian-ext",
                layers=(Layer(files={"usr/share/debian-ext/hello": "hello from a Debian extension\n"}),),
                labels=dict(OVERLAY_CLASS),
            )
            stale = ExtensionSpec(  # Debian 12 is running: the cleanup after the confirmed boot removes it
                name="debian-stale",
                layers=(Layer(files={"usr/share/debian-stale/hello": "made for Debian 11\n"}),),
                labels={**OVERLAY_CLASS, "io.balena.image.os-version": "11"},
            )
            live = ExtensionSpec(  # installed in the booted system by the live probe, merged at its start
                name="debian-live",
                layers=(Layer(files={"usr/share/debian-live/hello": "hello from a live extension\n"}),),
                labels=dict(OVERLAY_CLASS),
            )
            images = build_scratch_images(ext, [spec, stale, live])
            ext_id = ext.create(images["debian-ext"], "debian-ext")
            stale_id = ext.create(images["debian-stale"], "debian-stale")
        finally:
            host.stop()
            ext.stop()
    for store in (sysroot / "balena", data / "docker"):
        (store / "volumes" / "backingFsBlockDev").unlink(missing_ok=True)
    (sysroot / "hostapps" / hostapp_id).mkdir(parents=True)
    (sysroot / "current").symlink_to(f"hostapps/{hostapp_id}")
    (data / "remove_me_to_reset").write_text("")
    return Device(sysroot=sysroot, data=data, hostapp_id=hostapp_id, hostapp_name="debian",
                  extensions={"debian-ext": ext_id, "debian-stale": stale_id}, apps=())


