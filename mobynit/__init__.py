"""mobynit: assemble a read-only root filesystem from a container store at boot."""

__version__ = "0.1.0"  # the one definition: pyproject.toml and the runtime read it
