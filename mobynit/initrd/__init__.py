"""The PID-1 sequence of the initramfs: partitions, console, handover."""
