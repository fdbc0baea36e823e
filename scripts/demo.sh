#!/bin/sh
# The README's first command: build a demo device (a hostapp and three
# extensions, one an override) with the real engine, boot it in QEMU with
# mobynit's initramfs, and show the console and the booted system's view.
# Extra arguments go on the kernel command line, e.g. balena.nohostext.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root (it installs packages, starts dockerd and writes device nodes)" >&2
    exit 1
fi
sh scripts/setup.sh
exec .venv/bin/python -m qemu.demo "$@"
