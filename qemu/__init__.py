"""Boot mobynit for real: a Debian kernel, the initramfs, balenaOS-layout
disk images built with the real engine, and QEMU (TCG) to run them."""
