"""The live layering probe of the Debian hostapp (qemu/debian.py), and its inputs.

On the debian-live disk (tests/boot/kit.py) the probe runs `LIVE_PROBE`
instead of the rest of its checks: the guest's systemd-sysext and `mobynit
merge` on the same sysext images, a refresh with a reader running, and a
container extension installed with the extension runtime, each step printing
MARK lines (tests/boot/test_live_boot.py reads them). `live_inputs` makes the
images on the host, with Debian's squashfs-tools.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

LIVE_MODULES = ("kernel/drivers/block/loop.ko", "kernel/fs/squashfs/squashfs.ko")  # what the live probe loads

# Live layering in the booted system (docs/live.md), on the debian-live disk: its data partition
# holds live-probe/images (made by `live_inputs`). Every step prints MARKs; the oracles are the
# kernel's mount table, the trees as read through /usr, and the guest's own systemd-sysext.
LIVE_PROBE = r"""#!/bin/sh
mark() { echo "MARK $*" > /dev/console; }
say() { while IFS= read -r line; do mark "$1" "$line"; done; }
in=/mnt/data/live-probe out=/run/live-probe
mkdir -p $out /run/extensions
mount -t tmpfs -o mode=1777 tmpfs /tmp  # the root is read-only; systemd-sysext reads image metadata via /tmp
# No kmod in this hostapp: loop and squashfs (shipped under /usr/lib/modules) loaded by finit_module.
python3 - <<'PY'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
base = f"/usr/lib/modules/{os.uname().release}/kernel/"
with open("/dev/console", "w") as console:
    for rel in ("drivers/block/loop.ko", "fs/squashfs/squashfs.ko"):
        fd = os.open(base + rel, os.O_RDONLY)
        ok = libc.syscall(313, fd, b"", 0) == 0 or ctypes.get_errno() == 17  # finit_module on x86_64; EEXIST: the initramfs loaded it
        print("MARK module", os.path.basename(rel), "loaded" if ok else os.strerror(ctypes.get_errno()), file=console)
PY
usr() { mark usr-mounts "$1 $(awk '$5 == "/usr" { for (i = 7; i <= NF; i++) if ($i == "-") print $(i + 1) ":" $(i + 2) }' /proc/self/mountinfo | tr '\n' ' ')"; }
tree() { mark tree "$1 $(mobynit-tree $out/stat.txt $out/$1.txt 2>&1 | tail -n 1)"; }
has() { l=$1; shift; for f in "$@"; do if [ -e "$f" ]; then mark has "$l $f $(head -n 1 "$f")"; else mark has "$l $f missing"; fi; done; }
# readdir (getdents64) errors of the root's directories, which glibc's readdir reports as an empty directory.
python3 - <<'PY' | say getdents
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(65536)
for d in ("/", "/usr", "/usr/share", "/usr/bin", "/usr/lib", "/etc", "/mnt/data"):
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    n = libc.syscall(217, fd, buf, 65536)
    print(d, n, os.strerror(ctypes.get_errno()) if n < 0 else "ok")
    os.close(fd)
PY
grep ' / / ' /proc/self/mountinfo | cut -c1-300 | say rootmount
# sysext images of the data partition's extensions/, joined to the root at boot: no mount on /usr yet.
usr boot; has boot /usr/share/boottool/data /usr/bin/boottool /usr/share/booterofs/data /usr/share/bootbad/data
dmesg | grep -i overlay | tail -n 5 | say dmesg
mobynit-tree - $out/stat.txt 2>&1 | tail -n 1 | say tree-stat; tree base
cp -a $in/images/dirtool $in/images/sqtool.raw /run/extensions/
# The differential: the guest's systemd-sysext, then mobynit, on the same images.
systemd-sysext merge 2>&1 | say sysext-said
usr sysext; tree sysext
systemd-sysext unmerge 2>&1 | say sysext-said
usr sysext-unmerged; tree sysext-unmerged
mobynit merge 2>&1 | say merge-said
usr merged; tree merged
diff $out/sysext.txt $out/merged.txt | head -n 8 | say tree-diff
mobynit list 2>&1 | say list
mobynit unmerge 2>&1 | say unmerge-said
usr unmerged; tree unmerged
# refresh swaps: dirtool out, newtool in, while a reader checks the base and sqtool throughout.
mobynit merge --quiet
rm -r /run/extensions/dirtool; cp $in/images/newtool.raw /run/extensions/
python3 - $out/stop > $out/watch.txt <<'PY' &
import os, sys
base = ("/usr/bin/systemctl", "/usr/lib/os-release")
checks = missing = ext_missing = 0
while not os.path.exists(sys.argv[1]):
    for f in base:
        checks += 1
        missing += not os.path.exists(f)
    ext_missing += not os.path.exists("/usr/share/sqtool/data")  # in both sets: absent while replaced
print(checks, missing, ext_missing)
PY
watcher=$!
sleep 1
mobynit refresh --json > $out/refresh.json 2> $out/refresh.err; mark refresh-rc "$?"
sleep 1; touch $out/stop; wait $watcher
mark watch "$(cat $out/watch.txt)"
mark refresh "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["state"], r["mechanism"], " ".join(sorted(e["name"] for e in r["extensions"] if e["merged"])))' $out/refresh.json)"
say refresh-said < $out/refresh.err
usr refreshed
has refreshed /usr/share/newtool/data /usr/share/sqtool/data /usr/bin/dirtool
mobynit unmerge --quiet
rm -r /run/extensions/*
usr sysext-gone; tree final
# A container extension that can go live: installed with the extension runtime, merged at start.
run=$(docker run --name live-ext --runtime extension --security-opt apparmor=unconfined debian-live:latest /never-run 2>&1)
mark live-ext-run "$? $(echo $run | tr '\n' ' ')"
usr container
has container /usr/share/debian-live/hello
mobynit status 2>&1 | grep '^live' | say live-status
mobynit unmerge --quiet
has container-unmerged /usr/share/debian-live/hello
usr container-unmerged
"""
# The tree oracle: one line per entry under the hierarchy (path, type, mode, owner, size, content
# hash or link target), /usr/.systemd-sysext left out (systemd-sysext's own metadata). With a base
# listing, a regular file whose size, mode and mtime match the base's is marked `base` instead of
# being read again: the guest has 512 MiB and no KVM, and reading all of /usr several times would
# take minutes. Prints the listing's sha256 and its number of entries.
TREE = r"""#!/usr/bin/python3
import hashlib, os, stat, sys
base_path, out_path = sys.argv[1], sys.argv[2]
top = sys.argv[3] if len(sys.argv) > 3 else "/usr"
base = {}
if base_path != "-":
    for line in open(base_path):
        f = line.rstrip("\n").split("\t")
        base[f[0]] = f
lines = []
def fail(e):
    raise e
for dirpath, dirs, names in os.walk(top, onerror=fail):
    if dirpath == top:
        dirs[:] = [d for d in dirs if d != ".systemd-sysext"]
    for name in dirs + names:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        m = st.st_mode
        kind = "d" if stat.S_ISDIR(m) else "l" if stat.S_ISLNK(m) else "f" if stat.S_ISREG(m) else "o%o" % stat.S_IFMT(m)
        row = [p, kind, "%o" % stat.S_IMODE(m), "%d:%d" % (st.st_uid, st.st_gid)]
        if kind == "l":
            row += ["", os.readlink(p)]
        elif kind == "f":
            row.append(str(st.st_size))
            old = base.get(p)
            if base_path == "-":
                row.append("mtime=%d" % st.st_mtime_ns)
            elif old and old[1:5] == row[1:5] and old[5] == "mtime=%d" % st.st_mtime_ns:
                row.append("base")
            else:
                with open(p, "rb") as fh:
                    row.append(hashlib.sha256(fh.read()).hexdigest())
        else:
            row += ["", ""]
        lines.append("\t".join(row))
lines.sort()
text = "".join(l + "\n" for l in lines)
with open(out_path, "w") as fh:
    fh.write(text)
print(hashlib.sha256(text.encode()).hexdigest()[:16], len(lines))
"""


LIVE_RELEASE = "ID=debian\nVERSION_ID=12\n"  # the hostapp's own os-release: both tools accept it


def _sysext_tree(top: Path, name: str, files: dict[str, str]) -> Path:
    for rel, text in {**files, f"usr/lib/extension-release.d/extension-release.{name}": LIVE_RELEASE}.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    return top


BOOT_IMAGES = {"boottool": "squashfs", "booterofs": "erofs", "bootbad": "squashfs"}  # in data/extensions


def live_inputs(data: Path) -> Path:
    """`data`/live-probe/images: the sysext images the live probe merges. `dirtool`
    (a directory) and `sqtool.raw` (squashfs) both ship usr/share/common/who, so
    their order shows; sqtool adds a symlink, an executable and a private
    directory; `newtool.raw` is the one refresh swaps in. And `data`/extensions,
    the images boot joins to the root (mobynit.core.images): a squashfs and an
    erofs one, and `bootbad`, which also ships etc/ and must be refused."""
    images = data / "live-probe" / "images"
    images.mkdir(parents=True)
    (data / "extensions").mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in BOOT_IMAGES.items():
            files = {f"usr/share/{name}/data": f"{name} data\n", f"usr/bin/{name}": f"#!/bin/sh\necho {name}\n"}
            if name == "bootbad":
                files["etc/bootbad.conf"] = "not for the root\n"
            src = _sysext_tree(Path(tmp) / name, name, files)
            out = data / "extensions" / f"{name}.raw"
            cmd = (["mksquashfs", str(src), str(out), "-quiet", "-noappend", "-all-root"] if kind == "squashfs"
                   else ["mkfs.erofs", "--quiet", "--all-root", str(out), str(src)])
            subprocess.run(cmd, check=True, capture_output=True)
    _sysext_tree(images / "dirtool", "dirtool", {"usr/bin/dirtool": "#!/bin/sh\necho dirtool\n",
                                                 "usr/share/common/who": "dirtool\n"})
    (images / "dirtool/usr/bin/dirtool").chmod(0o755)
    with tempfile.TemporaryDirectory() as tmp:
        sq = _sysext_tree(Path(tmp) / "sqtool", "sqtool", {"usr/share/sqtool/data": "sqtool data\n",
                                                         "usr/share/common/who": "sqtool\n",
                                                         "usr/lib/sqtool/private/conf": "secret\n",
                                                         "usr/bin/sqtool": "#!/bin/sh\necho sqtool\n"})
        (sq / "usr/bin/sqtool").chmod(0o755)
        (sq / "usr/lib/sqtool/private").chmod(0o750)
        (sq / "usr/bin/sq").symlink_to("sqtool")
        new = _sysext_tree(Path(tmp) / "newtool", "newtool", {"usr/share/newtool/data": "newtool data\n"})
        for src, name in ((sq, "sqtool.raw"), (new, "newtool.raw")):
            subprocess.run(["mksquashfs", str(src), str(images / name), "-quiet", "-noappend", "-all-root"],
                           check=True, capture_output=True)
    return images
