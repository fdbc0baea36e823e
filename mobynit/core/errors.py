"""The exceptions mobynit raises: each carries a sentence a person can act on.

They are caught once, at the top of each command. A fault in an extension is
never raised that far: the selection turns it into a skip reason.
"""


class MobynitError(Exception):
    """A failure with a message fit for the console, no traceback needed."""


class StoreError(MobynitError):
    """Something in a container store is missing or malformed; names the file.

    Its message is made printable here, once: it is built from names found in
    the store (directory entries, link targets), which must never forge a
    console line or reach a terminal raw.
    """

    def __init__(self, message: str) -> None:
        super().__init__(shown(message, 600))


class HostappError(MobynitError):
    """The hostapp cannot be mounted: the only fault that stops a boot."""


class MountError(MobynitError):
    """A mount operation failed; says which one and why."""


class UsageError(MobynitError):
    """The command line given to mobynit itself is wrong."""


def shown(value: object, limit: int = 80) -> str:
    """A value from the store made safe to print: control characters escaped, length capped.

    Labels and names are data written by whoever built an image; they must not
    be able to forge console lines or flood a log.
    """
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(ord(c)) for c in text)


def _escape(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
