"""Test and development harness: real dockerd engines, rootfs trees, balenaOS-layout devices.

Not part of the mobynit package and never on the boot path.
"""
