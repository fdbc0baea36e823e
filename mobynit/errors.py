"""The exceptions mobynit raises: each carries a sentence a person can act on.

They are caught once, at the top of each command. A fault in an extension is
never raised that far: the selection turns it into a skip reason.
"""


class MobynitError(Exception):
    """A failure with a message fit for the console, no traceback needed."""


class StoreError(MobynitError):
    """Something in a container store is missing or malformed; names the file."""


class HostappError(MobynitError):
    """The hostapp cannot be mounted: the only fault that stops a boot."""


class MountError(MobynitError):
    """A mount operation failed; says which one and why."""


class UsageError(MobynitError):
    """The command line given to mobynit itself is wrong."""
