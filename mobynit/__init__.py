"""mobynit: assemble a read-only root filesystem from a container store at boot."""

__version__ = "0.1.0"

# Where boot puts things; shared by the CLI's help and the assembler.
DEFAULT_TARGET = "/sysroot"  # outside /run, which boot moves into the new root
DEFAULT_WORKDIR = "/run/mobynit/work"
DEFAULT_RECORD = "/run/mobynit/boot.json"
