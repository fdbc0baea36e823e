#!/bin/sh
# Installs what mobynit's tests and demo need on a fresh Debian machine (run as root):
# Debian packages, then a virtual environment in .venv with the package and its test tools.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="python3 python3-venv docker.io busybox-static e2fsprogs cpio qemu-system-x86 qemu-utils squashfs-tools erofs-utils
util-linux kmod debootstrap zstd gzip fdisk"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import mobynit, attrs, pyroute2, pytest, hypothesis' 2>/dev/null; then
    echo "setup: creating .venv"
    /usr/bin/python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
fi
