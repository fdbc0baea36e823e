"""mobynit: assemble a read-only root filesystem from a container store at boot."""

__version__ = "0.1.0"
